"""Generation with the real simulator: small episodes so the whole file runs in seconds."""

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")

from recipes.metaworld import generate as gen  # noqa: E402
from recipes.metaworld.generate import Curriculum, GenerationSpec, generate_dataset  # noqa: E402
from recipes.metaworld.storage import load_dataset, read_sidecar, task_paths  # noqa: E402

TASKS = ["reach-v3", "drawer-close-v3"]
# 6 episodes of 60 steps per task in the full schedule
SPEC = GenerationSpec(composition="near_optimal", transitions_per_task=360, episode_length=60, seed=3)


def test_curriculum_levels():
    c = Curriculum()
    assert c.levels(0, 100, "easy") == {"phase": "random", "eps": 1.0, "offset_std": 0.0, "noise_std": 0.0}
    mid = c.levels(50, 100, "very_hard")  # f = 0.5, g = (0.5 - 0.05) / (0.6 - 0.05)
    g = 0.45 / 0.55
    assert mid["phase"] == "learning"
    assert mid["eps"] == pytest.approx(0.9 * (1 - g) ** 1.5)
    assert mid["offset_std"] == pytest.approx(0.1 * (1 - g))
    assert mid["noise_std"] == pytest.approx(0.1 + 0.5 * (1 - g))
    assert c.levels(5, 100, "easy")["eps"] == pytest.approx(0.9)  # start of the learning phase
    assert c.levels(30, 100, "easy") == {"phase": "expert", "eps": 0.0, "offset_std": 0.0, "noise_std": 0.1}
    assert c.levels(30, 100, "hard")["phase"] == "learning"


def test_spec_checks():
    assert SPEC.schedule_episodes == 6 and SPEC.n_episodes == 6
    sub = GenerationSpec(composition="sub_optimal", transitions_per_task=360, episode_length=60, seed=3)
    assert sub.n_episodes == 3 and sub.dirname() != SPEC.dirname()
    with pytest.raises(ValueError, match="data.transitions_per_task=350 must be a multiple"):
        GenerationSpec(transitions_per_task=350, episode_length=60)
    with pytest.raises(ValueError, match="data.composition='expert'"):
        GenerationSpec(composition="expert")
    with pytest.raises(ValueError, match=r"learn_end out of range: \{'easy': 0.01\}"):
        GenerationSpec(curriculum=Curriculum(learn_end={"easy": 0.01, "medium": 0.4, "hard": 0.5, "very_hard": 0.6}))
    node = {"composition": "near_optimal", "transitions_per_task": 360, "episode_length": 60, "seed": 3,
            "curriculum": {"offset_std": 0, "learn_end": {"easy": 1, "medium": 0.4, "hard": 0.5, "very_hard": 0.6}}}
    as_ints = GenerationSpec.from_config(node)
    node["curriculum"] = {"offset_std": 0.0, "learn_end": {"easy": 1.0, "medium": 0.4, "hard": 0.5, "very_hard": 0.6}}
    assert as_ints.dirname() == GenerationSpec.from_config(node).dirname()


def test_make_env_random_goal_visible():
    env = gen.make_env("reach-v3", 0)
    o1, _ = env.reset()
    o2, _ = env.reset()
    assert o1.shape == (39,) and np.any(o1[36:39] != 0)   # goal visible
    assert np.any(o1[36:39] != o2[36:39])                  # a new goal per reset


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    summaries = generate_dataset(SPEC, TASKS, d, workers=1, checkpoint_every=2, progress=False)
    return d, summaries


def test_generates_two_tasks(generated):
    d, summaries = generated
    assert [s["task"] for s in summaries] == TASKS and not any(s["skipped"] for s in summaries)
    ds = load_dataset(d, TASKS)
    for t in TASKS:
        data = ds[t]
        assert data.observations.shape == (360, 39) and data.actions.shape == (360, 4)
        np.testing.assert_array_equal(data.episode_starts, np.arange(0, 361, 60))
        assert np.abs(data.actions).max() <= 1.0
        assert data.success.dtype == bool and data.success.shape == (6,)
        # goal (obs[36:39]) is constant within an episode and differs between episodes
        goals = data.observations[data.episode_starts[:-1], 36:39]
        assert len(np.unique(goals, axis=0)) == 6
        prov = read_sidecar(d, t)["provenance"]
        assert prov["spec"] == SPEC.key() and prov["versions"]["metaworld"].startswith("3.")
        assert prov["episode_phase"][0] == "random" and prov["episode_phase"][-1] == "expert"
        assert len(read_sidecar(d, t)["stats"]["episode_success"]) == 6
    assert json.loads((d / "generation.json").read_text()) == SPEC.key()
    assert not list(d.glob(".partial/*/*.npz"))  # checkpoints of finished tasks are removed


def test_rerun_skips_complete_tasks(generated):
    d, _ = generated
    before = {t: task_paths(d, t)[0].stat().st_mtime_ns for t in TASKS}
    again = generate_dataset(SPEC, TASKS, d, workers=1, progress=False)
    assert all(s["skipped"] for s in again)
    assert before == {t: task_paths(d, t)[0].stat().st_mtime_ns for t in TASKS}


def test_deterministic_and_independent_of_task_set(generated, tmp_path):
    d, _ = generated
    generate_dataset(SPEC, ["drawer-close-v3"], tmp_path, progress=False)  # alone, not after reach
    a, b = load_dataset(d, ["drawer-close-v3"]), load_dataset(tmp_path, ["drawer-close-v3"])
    np.testing.assert_array_equal(a["drawer-close-v3"].observations, b["drawer-close-v3"].observations)
    np.testing.assert_array_equal(a["drawer-close-v3"].actions, b["drawer-close-v3"].actions)


def test_sub_optimal_is_prefix_of_near_optimal(generated, tmp_path):
    d, _ = generated
    sub = GenerationSpec(composition="sub_optimal", transitions_per_task=360, episode_length=60, seed=3)
    generate_dataset(sub, ["reach-v3"], tmp_path, progress=False)
    s, n = load_dataset(tmp_path, ["reach-v3"])["reach-v3"], load_dataset(d, ["reach-v3"])["reach-v3"]
    assert s.n_episodes == 3
    h = n.head(3)
    for key in ("observations", "actions", "rewards", "episode_starts", "success"):
        np.testing.assert_array_equal(getattr(s, key), getattr(h, key))


@pytest.mark.parametrize("every, chunks, replayed", [(1, 3, 3), (2, 1, 4)])
def test_interrupted_run_resumes_without_duplicates(generated, tmp_path, monkeypatch, every, chunks, replayed):
    """Crash during episode 3 of 6; checkpoints every ``every`` episodes keep ``chunks`` chunk files."""
    d, _ = generated
    calls = {"n": 0}
    real = gen.run_episode

    def crashing(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "run_episode", crashing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(SPEC, ["reach-v3"], tmp_path, checkpoint_every=every, progress=False)
    assert len(list((tmp_path / ".partial" / "reach-v3").glob("chunk_*.npz"))) == chunks
    assert not task_paths(tmp_path, "reach-v3")[1].exists()

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "run_episode", counting)
    generate_dataset(SPEC, ["reach-v3"], tmp_path, checkpoint_every=every, progress=False)
    assert counted["n"] == replayed  # only episodes not in a checkpoint are played again
    resumed, clean = load_dataset(tmp_path, ["reach-v3"])["reach-v3"], load_dataset(d, ["reach-v3"])["reach-v3"]
    assert resumed.n_episodes == 6 and read_sidecar(tmp_path, "reach-v3")["provenance"]["resumed_from_episode"] == 6 - replayed
    for key in ("observations", "actions", "rewards", "episode_starts", "success"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(clean, key))
    assert not (tmp_path / ".partial" / "reach-v3").exists()


def test_foreign_generation_folder_refused(generated):
    d, _ = generated
    other = GenerationSpec(composition="near_optimal", transitions_per_task=360, episode_length=60, seed=4)
    with pytest.raises(Exception, match="another generation config"):
        generate_dataset(other, TASKS, d, progress=False)


@pytest.mark.slow
def test_parallel_matches_serial(generated, tmp_path):
    d, _ = generated
    summaries = generate_dataset(SPEC, TASKS, tmp_path, workers=2, progress=False)
    assert [s["task"] for s in summaries] == TASKS
    a, b = load_dataset(d, TASKS), load_dataset(tmp_path, TASKS)
    for t in TASKS:
        np.testing.assert_array_equal(a[t].observations, b[t].observations)


def test_ensure_dataset_generates_once(tmp_path, monkeypatch):
    from recipes.metaworld import make_data

    data = {"taskset": "MT5", "tasks": ["reach-v3"], "composition": "sub_optimal", "transitions_per_task": 200,
            "episode_length": 50, "seed": 0, "workers": 1}
    ds = make_data.ensure_dataset(data, tmp_path, progress=False)
    assert ds.tasks == ["reach-v3"] and ds["reach-v3"].n_episodes == 2

    def no_generation(*a, **k):
        raise AssertionError("complete data must be loaded, not generated")

    monkeypatch.setattr(make_data, "generate_dataset", no_generation)
    again = make_data.ensure_dataset(data, tmp_path, progress=False)
    np.testing.assert_array_equal(again["reach-v3"].observations, ds["reach-v3"].observations)
    with pytest.raises(Exception, match="no Meta-World data chosen"):
        make_data.ensure_dataset({}, tmp_path)


def test_task_finished_elsewhere_meanwhile(generated, tmp_path, monkeypatch):
    """If another process stores the task while this one plays it, this one keeps the stored file."""
    import shutil

    d, _ = generated
    real = gen.run_episode
    calls = {"n": 0}

    def other_process_finishes(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the last episode: the "other process" stores the finished task
            for p in task_paths(d, "reach-v3"):
                shutil.copy(p, tmp_path / p.name)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "run_episode", other_process_finishes)
    summary = gen.generate_task("reach-v3", SPEC, tmp_path, checkpoint_every=2)
    assert summary["skipped"] and calls["n"] == 6
    assert load_dataset(tmp_path, ["reach-v3"])["reach-v3"].n_episodes == 6
    assert not (tmp_path / ".partial" / "reach-v3").exists()


def test_demonstrations_added_to_existing_data(generated, tmp_path, monkeypatch):
    """Asking for demos on complete data plays only the demonstrations, with their own seeds."""
    import shutil

    d, _ = generated
    for p in task_paths(d, "reach-v3"):
        shutil.copy(p, tmp_path / p.name)
    shutil.copy(d / "generation.json", tmp_path / "generation.json")
    real, calls = gen.run_episode, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "run_episode", counting)
    generate_dataset(SPEC, ["reach-v3"], tmp_path, progress=False, demos=2)
    assert calls["n"] == 2
    ds = load_dataset(tmp_path, ["reach-v3"], demos=2)
    demo, data = ds.demos["reach-v3"], ds["reach-v3"]
    assert demo.n_episodes == 2 and demo.n_transitions == 120
    assert read_sidecar(tmp_path / "demos-2", "reach-v3")["provenance"]["levels"]["phase"] == "expert"
    goals = lambda x: {tuple(g) for g in x.observations[x.episode_starts[:-1], 36:39]}  # noqa: E731
    assert not goals(demo) & goals(data)  # different episodes from the training data
    generate_dataset(SPEC, ["reach-v3"], tmp_path, progress=False, demos=2)
    assert calls["n"] == 2  # complete: nothing played again
