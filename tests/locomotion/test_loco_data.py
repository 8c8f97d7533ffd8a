"""Locomotion data: storage, reuse, resume after an interrupted task, and the make_data recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from maskmtl.config import ConfigError
from recipes.locomotion import make_data as loco
from recipes.metaworld.storage import read_sidecar, task_paths

ROOT = Path(__file__).resolve().parents[2]


def smoke_data(name="cheetah_vel", **overrides):
    node = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    node.pop("defaults")
    for key, value in loco.smoke_data_overrides(node).items():
        OmegaConf.update(node, key.removeprefix("data."), value)
    return OmegaConf.merge(node, overrides)


def test_generate_reuse_and_resume(tmp_path, monkeypatch):
    data = smoke_data()
    dataset, unseen = loco.ensure_dataset(data, tmp_path, progress=False)
    assert dataset.tasks == ["cheetah_vel-0", "cheetah_vel-1"] and (dataset.obs_dim, dataset.act_dim) == (20, 6)
    assert dataset["cheetah_vel-0"].n_transitions == 10 and dataset.demos["cheetah_vel-1"].n_episodes == 1
    assert unseen.tasks == ["cheetah_vel-2"]
    directory = loco.dataset_dir(data, tmp_path)
    assert directory.parent.name == "locomotion" and directory.name.startswith("cheetah_vel-near_optimal-1ep-10steps-seed0-")
    side = read_sidecar(directory, "cheetah_vel-1")
    assert side["provenance"]["generator"] == "mppi" and side["provenance"]["goal"] == pytest.approx(0.15)
    sha = side["npz_sha256"]

    # a complete dataset is only loaded: no generation at all
    def fail(*a, **k):
        raise AssertionError("regenerated a complete task")
    monkeypatch.setattr(loco, "generate_task", fail)
    loco.ensure_dataset(data, tmp_path, progress=False)
    monkeypatch.undo()

    # interrupted mid-task: archive half written, no sidecar -> that task alone is generated again, identically
    npz, sidecar = task_paths(directory, "cheetah_vel-1")
    sidecar.unlink()
    npz.write_bytes(npz.read_bytes()[:100])
    before = task_paths(directory, "cheetah_vel-0")[1].stat().st_mtime_ns
    dataset2, _ = loco.ensure_dataset(data, tmp_path, progress=False)
    assert read_sidecar(directory, "cheetah_vel-1")["npz_sha256"] == sha
    assert task_paths(directory, "cheetah_vel-0")[1].stat().st_mtime_ns == before
    assert np.array_equal(dataset2["cheetah_vel-1"].actions, dataset["cheetah_vel-1"].actions)


def test_settings_change_the_folder(tmp_path):
    base = loco.dataset_dir(smoke_data(), tmp_path)
    for change in ({"seed": 1}, {"composition": "sub_optimal"}, {"goals": "sampled"}, {"episodes_per_task": 2}):
        assert loco.dataset_dir(smoke_data(**change), tmp_path) != base
    assert loco.dataset_dir(smoke_data(workers=2), tmp_path) == base       # how, not what
    with pytest.raises(ConfigError, match="data.workers=0"):
        loco.check_data_config(smoke_data(workers=0))


@pytest.mark.slow
def test_make_data_recipe_smoke(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "recipe=make_data", "data=cheetah_dir",
                        "debug=smoke", f"data_root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["tasks"] == ["cheetah_dir-0", "cheetah_dir-1"] and set(summary["demonstrations"]) == set(summary["tasks"])
    assert summary["spec"]["family"] == "cheetah_dir"


@pytest.mark.slow
def test_killed_generation_resumes_to_the_same_data(tmp_path):
    """SIGKILL after cheetah_dir-1's first episode (before it is stored); a rerun keeps
    cheetah_dir-0 and the demonstrations already written and ends with the data of an uninterrupted run."""
    import os

    def run(root, kill=None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("MASKMTL_KILL_AT_STEP", None)
        if kill:
            env["MASKMTL_KILL_AT_STEP"] = kill
        return subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "recipe=make_data", "data=cheetah_dir",
                               "debug=smoke", "data.episodes_per_task=2", f"data_root={root}",
                               f"hydra.run.dir={root}-run-{kill}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300, env=env)

    data = smoke_data("cheetah_dir", episodes_per_task=2)
    killed = run(tmp_path / "a", kill="data:cheetah_dir-1:1")
    assert killed.returncode != 0
    directory = loco.dataset_dir(data, tmp_path / "a")
    assert (directory / "cheetah_dir-0.json").exists() and not (directory / "cheetah_dir-1.json").exists()
    kept = (directory / "cheetah_dir-0.json").stat().st_mtime_ns
    assert run(tmp_path / "a").returncode == 0
    assert (directory / "cheetah_dir-0.json").stat().st_mtime_ns == kept
    assert run(tmp_path / "b").returncode == 0
    clean = loco.dataset_dir(data, tmp_path / "b")
    for t in ("cheetah_dir-0", "cheetah_dir-1"):
        assert read_sidecar(directory, t)["npz_sha256"] == read_sidecar(clean, t)["npz_sha256"]
        assert read_sidecar(directory / "demos-1", t)["npz_sha256"] == read_sidecar(clean / "demos-1", t)["npz_sha256"]


@pytest.mark.slow
def test_workers_give_the_same_data(tmp_path):
    one, two = smoke_data(), smoke_data(workers=2)
    loco.ensure_dataset(one, tmp_path / "one", progress=False)
    loco.ensure_dataset(two, tmp_path / "two", progress=False)
    a, b = loco.dataset_dir(one, tmp_path / "one"), loco.dataset_dir(two, tmp_path / "two")
    for t in ("cheetah_vel-0", "cheetah_vel-1"):
        assert read_sidecar(a, t)["npz_sha256"] == read_sidecar(b, t)["npz_sha256"]
    assert read_sidecar(a / "demos-1", "cheetah_vel-2")["npz_sha256"] == read_sidecar(b / "demos-1", "cheetah_vel-2")["npz_sha256"]
