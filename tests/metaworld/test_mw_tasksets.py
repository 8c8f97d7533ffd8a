import pytest

from recipes.metaworld.tasksets import (DIFFICULTY, ML45_TEST, PAPER_ORDER, UnknownTaskError, canonical_task,
                                        resolve_tasks, taskset)


def test_paper_order_and_prefixes():
    assert len(PAPER_ORDER) == 50 == len(set(PAPER_ORDER))
    assert PAPER_ORDER[:3] == ("basketball-v3", "bin-picking-v3", "button-press-topdown-v3")
    assert PAPER_ORDER[-1] == "box-close-v3"
    for name, n in (("MT5", 5), ("MT10", 10), ("MT30", 30), ("MT50", 50)):
        assert taskset(name) == list(PAPER_ORDER[:n])


def test_against_metaworld_lists():
    pytest.importorskip("metaworld")
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML45_V3, MT10_V3

    assert set(PAPER_ORDER) == set(ALL_V3_ENVIRONMENTS)
    assert taskset("MT10-metaworld") == list(MT10_V3)
    assert set(taskset("ML45-test")) == set(ML45_V3["test"])
    assert set(taskset("ML45-train")) == set(ML45_V3["train"])


def test_ml45_split_and_difficulty():
    train, test = taskset("ML45-train"), taskset("ML45-test")
    assert len(train) == 45 and len(test) == 5 and not set(train) & set(test)
    assert train == [t for t in PAPER_ORDER if t not in ML45_TEST]  # papers' order kept
    assert {v: list(DIFFICULTY.values()).count(v) for v in set(DIFFICULTY.values())} == \
        {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}


def test_names_and_errors():
    assert canonical_task("reach") == canonical_task("reach-v2") == "reach-v3"
    assert resolve_tasks("MT5", ["push-v2", "reach"]) == ["push-v3", "reach-v3"]
    assert resolve_tasks("MT5", None) == taskset("MT5")
    with pytest.raises(UnknownTaskError, match="unknown task set 'MT11'"):
        taskset("MT11")
    with pytest.raises(UnknownTaskError, match="unknown Meta-World task 'fly-v3'"):
        canonical_task("fly-v3")
    with pytest.raises(UnknownTaskError, match="duplicate"):
        resolve_tasks(None, ["reach-v3", "reach"])
