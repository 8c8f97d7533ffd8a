"""Locomotion task ids, goals, the papers' split and the data configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from maskmtl.config import ConfigError
from recipes.locomotion.config import split_from_config
from recipes.locomotion.tasks import (N_TASKS, TEST_TASKS, TRAIN_TASKS, UnknownLocomotionTaskError, goals,
                                      parse_task, resolve_tasks, task, taskset)

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_split_is_the_papers_table_viii():
    assert taskset("cheetah_vel-test") == [f"cheetah_vel-{i}" for i in (2, 7, 15, 23, 26)]
    assert taskset("ant_dir-test") == [f"ant_dir-{i}" for i in (6, 17, 23, 30, 41)]
    assert taskset("cheetah_dir-train") == taskset("cheetah_dir-test") == ["cheetah_dir-0", "cheetah_dir-1"]
    # Table VIII's ranges, written out: Cheetah-vel [0-1,3-6,8-14,16-22,24-25,27-39], Ant-dir
    # [0-5,7-16,18-22,24-29,31-40,42-49].
    ranges = lambda *rs: [i for a, b in rs for i in range(a, b + 1)]
    assert list(TRAIN_TASKS["cheetah_vel"]) == ranges((0, 1), (3, 6), (8, 14), (16, 22), (24, 25), (27, 39))
    assert list(TRAIN_TASKS["ant_dir"]) == ranges((0, 5), (7, 16), (18, 22), (24, 29), (31, 40), (42, 49))
    for fam, (n_train, n_test) in {"cheetah_vel": (35, 5), "ant_dir": (45, 5)}.items():
        train, test = set(TRAIN_TASKS[fam]), set(TEST_TASKS[fam])
        assert (len(train), len(test)) == (n_train, n_test) and not train & test
        assert train | test == set(range(N_TASKS[fam]))
        assert len(taskset(f"{fam}-all")) == N_TASKS[fam]


def test_prompt_dt_goals():
    v = goals("cheetah_vel")
    assert v.shape == (40,) and v[0] == pytest.approx(0.075) and v[-1] == pytest.approx(3.0)
    assert np.allclose(np.diff(v), 0.075)
    assert task("cheetah_vel-2").goal == pytest.approx(0.225)
    assert [task(f"cheetah_dir-{i}").goal for i in (0, 1)] == [1.0, -1.0]
    a = goals("ant_dir")
    assert a.shape == (50,) and len(set(a.tolist())) == 50 and ((0 <= a) & (a < 2 * math.pi)).all()
    assert task("ant_dir-0").goal == pytest.approx(1.2033605945679715, abs=1e-15)
    assert task("ant_dir-49").goal == pytest.approx(0.1831988121347493, abs=1e-15)


def test_sampled_goals_reproducible_from_seed():
    for fam, hi in (("cheetah_vel", 3.0), ("ant_dir", 2 * math.pi)):
        g0, g0b, g1 = goals(fam, "sampled", 0), goals(fam, "sampled", 0), goals(fam, "sampled", 1)
        assert np.array_equal(g0, g0b) and not np.allclose(g0, g1)
        assert g0.shape == (N_TASKS[fam],) and ((0 <= g0) & (g0 < hi)).all()
        assert not np.allclose(g0, goals(fam, "prompt_dt"))
    assert np.array_equal(goals("cheetah_dir", "sampled", 5), [1.0, -1.0])
    # a family's goals do not depend on the other families
    assert not np.allclose(goals("cheetah_vel", "sampled", 0)[:5], goals("ant_dir", "sampled", 0)[:5])


@pytest.mark.parametrize("call,match", [
    (lambda: parse_task("cheetah_vel-40"), "tasks 0..39"),
    (lambda: parse_task("cheetah-1"), "unknown locomotion task"),
    (lambda: parse_task("ant_dir-x"), "unknown locomotion task"),
    (lambda: taskset("ant_dir-val"), "unknown locomotion task set"),
    (lambda: goals("hopper"), "unknown locomotion family"),
    (lambda: goals("ant_dir", "pearl"), "unknown goal source"),
    (lambda: resolve_tasks(tasks=["ant_dir-1", "ant_dir-1"]), "duplicate"),
    (lambda: resolve_tasks(tasks=["ant_dir-1"], family="cheetah_vel"), "not in family cheetah_vel"),
])
def test_bad_names_raise(call, match):
    with pytest.raises(UnknownLocomotionTaskError, match=match):
        call()


def load_data(name: str, **overrides):
    node = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    node.pop("defaults")
    return OmegaConf.merge(node, overrides)


@pytest.mark.parametrize("name,n_train,n_test,n_unseen", [
    ("cheetah_vel", 35, 5, 5), ("cheetah_dir", 2, 2, 0), ("ant_dir", 45, 5, 5)])
def test_data_configs(name, n_train, n_test, n_unseen):
    s = split_from_config(load_data(name))
    assert s.family == name and s.episode_length == 200 and s.episodes_per_task == 5
    assert s.composition == "near_optimal"
    assert (len(s.train), len(s.test), len(s.unseen)) == (n_train, n_test, n_unseen)
    assert [t.name for t in s.test] == taskset(f"{name}-test")
    assert [t.goal for t in s.train] == [task(t.name).goal for t in s.train]


@pytest.mark.parametrize("overrides,match", [
    ({"family": "hopper"}, "data.family='hopper'"),
    ({"goals": "pearl"}, "data.goals='pearl'"),
    ({"seed": -1}, "data.seed=-1"),
    ({"episode_length": 0}, "data.episode_length=0"),
    ({"taskset": "cheetah_vel-val"}, "data.taskset / data.tasks"),
    ({"tasks": ["ant_dir-3"]}, "data.taskset / data.tasks.*not in family cheetah_vel"),
    ({"unseen_tasks": ["cheetah_vel-3"], "unseen_taskset": None}, "data.unseen_tasks.*training tasks too"),
    ({"prompt_demos": 0}, "data.prompt_demos must be >= 1"),
    ({"benchmark": None}, "data.benchmark"),
    ({"episodes_per_task": 0}, "data.episodes_per_task=0"),
    ({"composition": "medium"}, "data.composition='medium'"),
])
def test_bad_config_names_its_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        split_from_config(load_data("cheetah_vel", **overrides))


def test_sampled_goals_through_config():
    a = split_from_config(load_data("cheetah_vel", goals="sampled", seed=3))
    b = split_from_config(load_data("cheetah_vel", goals="sampled", seed=3))
    assert [t.goal for t in a.train] == [t.goal for t in b.train]
    assert [t.goal for t in a.train] != [t.goal for t in split_from_config(load_data("cheetah_vel")).train]


def test_metaworld_data_path_refuses_locomotion():
    from recipes.metaworld.make_data import dataset_tasks, ensure_dataset, smoke_data_overrides, unseen_tasks

    for call in (dataset_tasks, unseen_tasks, smoke_data_overrides, lambda d: ensure_dataset(d, "unused")):
        with pytest.raises(ConfigError, match="data.benchmark=locomotion .*reads Meta-World data only"):
            call(load_data("ant_dir"))


@pytest.mark.parametrize("name", ["cheetah_vel", "cheetah_dir", "ant_dir"])
def test_composes_with_harmodt(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=harmodt", f"data={name}"])
    assert cfg.data.family == name and cfg.data.sampling.context == 20
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # evaluation episodes follow the data's (200 steps), Meta-World's default (500) stays
    assert resolved["eval"]["max_steps"] == resolved["data"]["episode_length"] == 200
