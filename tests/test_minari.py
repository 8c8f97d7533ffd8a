"""Minari export and reader (recipes/metaworld/minari_format.py): round trip, provenance, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

minari = pytest.importorskip("minari")

from recipes.metaworld.minari_format import dataset_id, export_minari, read_minari  # noqa: E402
from recipes.metaworld.sampler import SamplingConfig, SegmentSampler  # noqa: E402
from recipes.metaworld.storage import DatasetError, OfflineDataset, TaskData, save_dataset  # noqa: E402

PROVENANCE = {"generator": "recipes.metaworld.generate", "spec": {"seed": 3, "episode_length": 30},
              "versions": {"metaworld": "3.1.1", "numpy": np.__version__}}


def _task(task: str, lengths, seed: int, obs_dim: int = 39, act_dim: int = 4) -> TaskData:
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    return TaskData(task, rng.normal(size=(n, obs_dim)).astype(np.float32),
                    rng.uniform(-1, 1, (n, act_dim)).astype(np.float32), rng.uniform(0, 10, n).astype(np.float32),
                    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    rng.random(len(lengths)) < 0.5, dict(PROVENANCE, task=task))


@pytest.fixture
def tiny():
    return OfflineDataset(["reach-v3", "push-v3"], {"reach-v3": _task("reach-v3", [30, 12, 25, 22], 1),
                                                    "push-v3": _task("push-v3", [18, 30, 9, 26], 2)})


@pytest.fixture(autouse=True)
def no_home_minari(tmp_path, monkeypatch):
    """Nothing may reach ~/.minari: the default root points into the test's folder."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "env-root"))


def test_round_trip_same_arrays_and_segments(tiny, tmp_path):
    save_dataset(tmp_path / "npz", tiny)
    written = export_minari(tiny, "near_optimal", tmp_path / "minari", source=tmp_path / "npz")
    assert sorted(written) == ["metaworld/push-v3/near_optimal-v0", "metaworld/reach-v3/near_optimal-v0"]
    assert not (tmp_path / "env-root" / "metaworld").exists()  # the argument wins over the variable
    back = read_minari(tiny.tasks, "near_optimal", tmp_path / "minari")
    assert back.tasks == tiny.tasks
    for t in tiny.tasks:
        for key in ("observations", "actions", "rewards", "episode_starts", "success"):
            a, b = getattr(tiny[t], key), getattr(back[t], key)
            assert a.dtype == b.dtype, (t, key)
            np.testing.assert_array_equal(a, b, err_msg=f"{t} {key}")
    config = SamplingConfig(context=8, prompt_length=4, heldout_episodes=1)
    one, two = SegmentSampler(tiny, config), SegmentSampler(back, config)
    tasks = np.random.default_rng(0).integers(0, 2, 64)
    x, y = one.sample(tasks, np.random.default_rng(7)), two.sample(tasks, np.random.default_rng(7))
    for field in ("states", "actions", "rewards", "returns_to_go", "timesteps", "mask", "prompt_states"):
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)


def test_minari_layout_and_provenance(tiny, tmp_path):
    save_dataset(tmp_path / "npz", tiny)
    export_minari(tiny, "sub_optimal", tmp_path / "minari", version=2, source=tmp_path / "npz")
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path / "minari")  # restored by monkeypatch
    ds = minari.load_dataset("metaworld/reach-v3/sub_optimal-v2")
    assert ds.total_episodes == 4 and ds.total_steps == 89
    ep = next(ds.iterate_episodes([0]))
    assert ep.observations.shape == (31, 39) and ep.actions.shape == (30, 4)
    np.testing.assert_array_equal(ep.observations[-1], ep.observations[-2])  # s_T repeats s_{T-1}
    assert not ep.terminations.any() and ep.truncations[-1] and not ep.truncations[:-1].any()
    assert ep.infos["success"].shape == (31,)
    meta = ds.storage.metadata
    prov = json.loads(meta["maskmtl_provenance"])
    assert prov["spec"]["seed"] == 3 and prov["versions"]["metaworld"] == "3.1.1"
    sidecar = json.loads((tmp_path / "npz" / "reach-v3.json").read_text())
    assert prov["stored_as"]["npz_sha256"] == sidecar["npz_sha256"]
    assert sidecar["npz_sha256"] in meta["description"] and meta["maskmtl_final_observation"] == "repeat"
    env_spec = ds.storage.metadata["eval_env_spec"]
    assert "recipes.metaworld.generate:make_env" in env_spec and '"reach-v3"' in env_spec


def test_overwrite_refused_and_names_the_dataset(tiny, tmp_path):
    export_minari(tiny, "near_optimal", tmp_path / "minari")
    meta = tmp_path / "minari" / "metaworld" / "reach-v3" / "near_optimal-v0" / "data" / "metadata.json"
    stamp = meta.stat().st_mtime_ns
    with pytest.raises(DatasetError, match=r"metaworld/reach-v3/near_optimal-v0 already exists at .*minari"):
        export_minari(tiny, "near_optimal", tmp_path / "minari")
    assert meta.stat().st_mtime_ns == stamp
    export_minari(tiny, "near_optimal", tmp_path / "minari", version=1)  # another version is fine


def test_failed_write_leaves_no_dataset(tiny, tmp_path, monkeypatch):
    real = minari.create_dataset_from_buffers

    def full_disk(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", full_disk)
    with pytest.raises(DatasetError, match=r"metaworld/reach-v3/near_optimal-v0 at .*No space left"):
        export_minari(tiny, "near_optimal", tmp_path / "minari")
    assert not (tmp_path / "minari" / "metaworld" / "reach-v3" / "near_optimal-v0").exists()
    monkeypatch.setattr(minari, "create_dataset_from_buffers", real)
    export_minari(tiny, "near_optimal", tmp_path / "minari")  # the id is free again


@pytest.mark.filterwarnings("ignore:.*is set to None:UserWarning", "ignore:env_spec is None:UserWarning")
def test_foreign_dataset_with_the_same_spaces(tmp_path, monkeypatch):
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "foreign"))
    rng = np.random.default_rng(5)
    buffers = [EpisodeBuffer(id=i, observations=rng.normal(size=(T + 1, 39)), actions=rng.uniform(-1, 1, (T, 4)),
                             rewards=rng.normal(size=T), terminations=np.zeros(T, bool),
                             truncations=np.arange(T) == T - 1, infos={"success": np.arange(T + 1) > T - 2})
               for i, T in enumerate((6, 9))]
    minari.create_dataset_from_buffers("someone/door-open-v0", buffers, observation_space=gym.spaces.Box(
        -np.inf, np.inf, (39,)), action_space=gym.spaces.Box(-1, 1, (4,)), author="x", author_email="x@y")
    back = read_minari(["door-open-v3"], ids={"door-open-v3": "someone/door-open-v0"})
    d = back["door-open-v3"]
    assert d.observations.dtype == np.float32 and d.episode_lengths().tolist() == [6, 9]
    np.testing.assert_array_equal(d.observations[:6], buffers[0].observations[:6].astype(np.float32))
    assert d.success.tolist() == [True, True] and d.provenance["minari_id"] == "someone/door-open-v0"


def test_wrong_spaces_and_missing_dataset(tmp_path):
    small = OfflineDataset(["reach-v3"], {"reach-v3": _task("reach-v3", [5, 6], 0, obs_dim=7)})
    export_minari(small, "near_optimal", tmp_path / "minari")
    with pytest.raises(DatasetError, match=r"metaworld/reach-v3/near_optimal-v0 .*observation space .*\(39,\)"):
        read_minari(["reach-v3"], "near_optimal", tmp_path / "minari")
    assert read_minari(["reach-v3"], "near_optimal", tmp_path / "minari", obs_dim=7)["reach-v3"].obs_dim == 7
    with pytest.raises(DatasetError, match=r"metaworld/push-v3/near_optimal-v0 not found"):
        read_minari(["push-v3"], "near_optimal", tmp_path / "minari")
    assert dataset_id("reach", "sub_optimal", 3) == "metaworld/reach-v3/sub_optimal-v3"


def test_make_data_checks_format(tiny, tmp_path):
    from omegaconf import OmegaConf

    from maskmtl.config import ConfigError
    from recipes.metaworld.make_data import check_export_config

    cfg = OmegaConf.create({"format": "minari", "minari_version": 0, "minari_root": str(tmp_path / "m"),
                            "data": {"composition": "near_optimal", "tasks": ["reach-v3", "push-v3"]}})
    check_export_config(cfg)
    export_minari(tiny, "near_optimal", tmp_path / "m")
    with pytest.raises(ConfigError, match=r"metaworld/reach-v3/near_optimal-v0 already exists .*minari_version"):
        check_export_config(cfg)  # before any data is made
    with pytest.raises(ConfigError, match="format='parquet'"):
        check_export_config(OmegaConf.create({"format": "parquet"}))
    with pytest.raises(ConfigError, match="minari_version=-1"):
        check_export_config(OmegaConf.create({"format": "minari", "minari_version": -1}))


def test_data_source_checks(tiny, tmp_path):
    """data.source=minari is checked before any training: datasets present, no demonstrations, no
    unseen tasks, ids of known tasks."""
    from maskmtl.config import ConfigError
    from recipes.metaworld.make_data import check_source, ensure_dataset, minari_ids

    data = {"composition": "near_optimal", "tasks": ["reach-v3", "push-v3"], "source": "minari",
            "minari_root": str(tmp_path / "m"), "prompt_demos": 0}
    with pytest.raises(ConfigError, match=r"no Minari dataset metaworld/reach-v3/near_optimal-v0, .*push-v3.* under"):
        check_source(data)
    export_minari(tiny, "near_optimal", tmp_path / "m")
    check_source(data)
    got = ensure_dataset(data, tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()  # nothing generated
    for t in tiny.tasks:
        np.testing.assert_array_equal(got[t].actions, tiny[t].actions)
    with pytest.raises(ConfigError, match="data.prompt_demos=2"):
        check_source({**data, "prompt_demos": 2})
    with pytest.raises(ConfigError, match="unseen_tasks"):
        check_source({**data, "unseen_tasks": ["pick-place-v3"]})
    with pytest.raises(ConfigError, match="data.source='hub'"):
        check_source({**data, "source": "hub"})
    with pytest.raises(ConfigError, match=r"data.minari_ids: \['door-open-v3'\]"):
        minari_ids({**data, "minari_ids": {"door-open-v3": "x/y-v0"}})
    assert minari_ids({**data, "minari_ids": {"push-v3": "lab/push-v2"}})["push-v3"] == "lab/push-v2"


@pytest.mark.slow
def test_training_on_exported_minari_data_equals_training_on_the_npz(tmp_path):
    """make_data exports the smoke data to Minari; harmodt trained from those Minari datasets
    (data.source=minari, nothing generated) gives the run trained from the .npz files."""
    from test_recipes import run

    m, d = tmp_path / "minari", tmp_path / "data"
    run("recipe=make_data", "debug=smoke", "format=minari", f"minari_root={m}", f"data_root={d}",
        f"hydra.run.dir={tmp_path / 'export'}")
    common = ["recipe=harmodt", "debug=smoke", "method=harmodt_f", "data.prompt_demos=0"]
    run(*common, f"data_root={d}", f"hydra.run.dir={tmp_path / 'npz'}")
    run(*common, "data.source=minari", f"data.minari_root={m}", f"data_root={tmp_path / 'empty'}",
        f"hydra.run.dir={tmp_path / 'minari_run'}")
    assert not (tmp_path / "empty").exists()
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("npz", "minari_run"))
    assert a["tasks"] == b["tasks"] and a["per_task"] == b["per_task"]
    la, lb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("npz", "minari_run"))
    losses = lambda rows: [r["train/loss"] for r in rows if "train/loss" in r]  # noqa: E731
    assert losses(la) and losses(la) == losses(lb)
