"""The main job (harmodt, smoke size) stopped at 10 points of its life, data generation to the
moment before results.json, then rerun with the same command: every rerun ends with the results,
masks, weights and metrics log of an uninterrupted run, and every file a run promises exists.

Kills are SIGKILL (no cleanup) at named points (``recipes.common.kill_point``, and
``MASKMTL_KILL_IN_WRITE`` inside an atomic write); SIGTERM is the polite stop (checkpoint, exit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipes import run as run_tool
import torch

from maskmtl import read_masks_file
from maskmtl.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PROMISED = ["results.json", "masks.safetensors", "metrics.jsonl", "checkpoint.pt", "curves.png", "masks.png",
            "diagnostics.png",
            ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
COMMON = ["recipe=harmodt", "debug=smoke", "threads=1", "train.steps=20", "train.checkpoint_every=10",
          "train.eval_every=10", "train.log_every=5", "masking.update_every=5", "train.task_sampling=uniform"]


def run(*args: str, env: dict | None = None):
    """tools/run.py with these arguments; the caller checks the exit status."""
    return run_tool(*args, env=env, check=False)


def finished(d: Path, data_root: Path, extra: tuple[str, ...] = ()) -> dict:
    p = run(*COMMON, *extra, f"data_root={data_root}", f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert all((d / f).exists() for f in PROMISED), [f for f in PROMISED if not (d / f).exists()]
    assert not list(d.glob(".*.tmp"))
    return json.loads((d / "results.json").read_text())


def metrics(d: Path) -> list[dict]:
    """The log without wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(d / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill_points")
    data_root = base / "data"
    ref = base / "uninterrupted"
    return ref, finished(ref, data_root), data_root


# (name, environment of the interrupted attempts, in order, and the step the last rerun resumes from)
POINTS = [
    ("data generation, 2nd episode of the first task", [{"MASKMTL_KILL_AT_STEP": "data:basketball-v3:2"}], None),
    ("training before the first checkpoint", [{"MASKMTL_KILL_AT_STEP": "3"}], None),
    ("in the step-10 evaluation", [{"MASKMTL_KILL_AT_STEP": "eval:10"}], None),
    ("writing the step-10 checkpoint", [{"MASKMTL_KILL_IN_WRITE": "checkpoint.pt"}], None),
    ("just after the step-10 checkpoint", [{"MASKMTL_KILL_AT_STEP": "10"}], 10),
    ("SIGTERM in step 13 (checkpoint at the next step, exit)", [{"MASKMTL_TERM_AT_STEP": "13"}], 14),
    ("before the final evaluation", [{"MASKMTL_KILL_AT_STEP": "final_eval"}], 20),
    ("figures written, results.json not", [{"MASKMTL_KILL_AT_STEP": "results"}], 20),
    ("twice: step 3, then step 17", [{"MASKMTL_KILL_AT_STEP": "3"}, {"MASKMTL_KILL_AT_STEP": "17"}], 10),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,attempts,resumed", POINTS, ids=[p[0] for p in POINTS])
def test_stopped_and_rerun_equals_uninterrupted(reference, tmp_path, name, attempts, resumed):
    stopped_and_rerun(reference, tmp_path, attempts, resumed)


# The locomotion data (Cheetah-vel smoke: 2 training tasks, 1 unseen task), scored by return.
LOCOMOTION = ("data=cheetah_vel",)
LOCOMOTION_POINTS = [
    ("data generation, the first training task", [{"MASKMTL_KILL_AT_STEP": "data:cheetah_vel-0:1"}], None),
    ("the unseen task's demonstration", [{"MASKMTL_KILL_AT_STEP": "demos:cheetah_vel-2:1"}], None),
    ("in the step-10 evaluation", [{"MASKMTL_KILL_AT_STEP": "eval:10"}], None),
    ("unseen tasks evaluated, figures written, results.json not", [{"MASKMTL_KILL_AT_STEP": "results"}], 20),
]


@pytest.fixture(scope="module")
def locomotion_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill_points_locomotion")
    data_root = base / "data"
    ref = base / "uninterrupted"
    return ref, finished(ref, data_root, LOCOMOTION), data_root, LOCOMOTION


@pytest.mark.slow
@pytest.mark.parametrize("name,attempts,resumed", LOCOMOTION_POINTS, ids=[p[0] for p in LOCOMOTION_POINTS])
def test_locomotion_stopped_and_rerun_equals_uninterrupted(locomotion_reference, tmp_path, name, attempts, resumed):
    rb = stopped_and_rerun(locomotion_reference, tmp_path, attempts, resumed)
    assert rb["headline"]["name"] == "return" and rb["unseen"]["tasks"] == ["cheetah_vel-2"]


def stopped_and_rerun(reference, tmp_path: Path, attempts: list[dict], resumed: int | None) -> dict:
    """Run the reference's command under each of ``attempts``' environments (each must fail without
    results), then once more: the last run resumes from ``resumed`` and ends equal to the reference."""
    ref, ra, shared_data, *extra = reference
    extra = tuple(extra[0]) if extra else ()
    # the data-generation points make their own data; the others reuse the reference's
    data_root = tmp_path / "data" if any(k in json.dumps(attempts) for k in ("data:", "demos:")) else shared_data
    d = tmp_path / "run"
    for env in attempts:
        p = run(*COMMON, *extra, f"data_root={data_root}", f"hydra.run.dir={d}", env=env)
        assert p.returncode != 0 and not (d / "results.json").exists(), p.stdout[-2000:]
        if "MASKMTL_TERM_AT_STEP" in env:
            assert "run the same command again to resume" in p.stderr
    rb = finished(d, data_root, extra)
    assert rb["resumed_from"] == resumed
    for key in ("per_task", "episodes", "best", "density", "rtg_target", "tasks", "unseen"):
        assert ra.get(key) == rb.get(key), key
    ma, mb = (read_masks_file(x / "masks.safetensors")[0] for x in (ref, d))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ca, cb = (torch.load(x / "checkpoint.pt", weights_only=True)["model"] for x in (ref, d))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert metrics(ref) == metrics(d)
    return rb
