"""Layers 4 and 5: CPU smoke runs of the recipes through the real command line, the output
contract, errors before training, and kill-and-resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskmtl import read_masks_file
from maskmtl.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), *args], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def check_contract(d: Path, recipe: str) -> dict:
    r = json.loads((d / "results.json").read_text())
    for key in ("recipe", "options", "tasks", "per_task", "headline", "steps", "wall_time_s"):
        assert key in r, key
    assert r["recipe"] == recipe and set(r["per_task"]) == set(r["tasks"])
    masks, tasks, t2g = read_masks_file(d / "masks.safetensors")
    assert tasks == r["tasks"] and len(t2g) == len(tasks)
    assert all(m.dtype == torch.bool and m.shape[0] == max(t2g) + 1 for m in masks.values())
    rows = read_metrics(d / "metrics.jsonl")
    assert rows and all("step" in row for row in rows)
    return r


def smoke_sweep(sweep: Path, methods: list[str], recipe: str = "harmodt") -> list[tuple[Path, dict]]:
    """``recipe`` with ``debug=smoke`` over ``methods`` as one multirun; every run's folder and
    results.json, after the contract and the smoke size's checks (20 steps, one episode per task,
    success in [0, 1]); each method ran exactly once."""
    run("-m", f"recipe={recipe}", "debug=smoke", f"method={','.join(methods)}", f"hydra.sweep.dir={sweep}")
    out = []
    for d in finished_runs(sweep):
        r = check_contract(d, recipe)
        assert r["steps"] == 20 and len(r["episodes"]) == len(r["tasks"])
        assert all(0.0 <= v["success"] <= 1.0 for v in r["per_task"].values())
        out.append((d, r))
    assert sorted(r["method"] for _, r in out) == sorted(methods)
    return out


def finished_runs(sweep: Path) -> list[Path]:
    """The job folders of a sweep that wrote results.json, in name order."""
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").exists())


def killed_and_resumed(common: list[str], tmp_path: Path, kill_at: int) -> tuple[dict, dict]:
    """Run ``common`` uninterrupted into ``a``; into ``b`` killed after step ``kill_at`` (it must
    fail without results) and rerun by the same command. Returns both results.json."""
    run(*common, f"hydra.run.dir={tmp_path / 'a'}")
    killed = run(*common, f"hydra.run.dir={tmp_path / 'b'}", env={"MASKMTL_KILL_AT_STEP": str(kill_at)}, check=False)
    assert killed.returncode != 0 and not (tmp_path / "b" / "results.json").exists()
    run(*common, f"hydra.run.dir={tmp_path / 'b'}")
    ra, rb = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    return ra, rb


@pytest.mark.slow
def test_digits_smoke_every_scorer_and_variant(tmp_path):
    run("-m", "recipe=digits", "debug=smoke", "scorer=fisher,magnitude,agreement,fisher_published",
        "variant=dense,frozen,learned", f"hydra.sweep.dir={tmp_path}")
    dirs = finished_runs(tmp_path)
    assert len(dirs) == 12
    for d in dirs:
        r = check_contract(d, "digits")
        assert r["steps"] == 20
        if r["options"]["variant"] == "dense":
            assert r["density"] == [1.0] * 4
        else:
            assert all(abs(x - 0.8) < 0.01 for x in r["density"])


@pytest.mark.slow
def test_digits_smoke_grouped(tmp_path):
    run("recipe=digits", "debug=smoke", "grouper=knn", "grouper.n_groups=2", "grouping.warmup_steps=5",
        "initializer=random", f"hydra.run.dir={tmp_path}")
    r = check_contract(tmp_path, "digits")
    assert sorted(set(r["task_to_group"])) == [0, 1] and len(r["density"]) == 2
    assert all(abs(x - 0.8) < 0.01 for x in r["density"])


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["element", "unit"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, granularity):
    common = ["recipe=digits", "debug=smoke", "train.steps=40", "train.checkpoint_every=10", "masking.update_every=5",
              "train.eval_every=10", "train.task_sampling=uniform", f"masking.granularity={granularity}"]
    ra, rb = killed_and_resumed(common, tmp_path, 27)
    assert rb["resumed_from"] == 20
    assert ra["per_task"] == rb["per_task"]
    ma, mb = read_masks_file(tmp_path / "a" / "masks.safetensors"), read_masks_file(tmp_path / "b" / "masks.safetensors")
    assert all(torch.equal(ma[0][k], mb[0][k]) for k in ma[0])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    # a finished run is never overwritten
    again = run(*common, f"hydra.run.dir={tmp_path / 'b'}", check=False)
    assert again.returncode != 0 and "already holds a finished run" in again.stderr + again.stdout


@pytest.mark.parametrize("override,message", [
    ("targets.include=nothing_matches", "targets.include='nothing_matches' matched none"),
    ("targets.exclude=.*", "excluded all"),
    ("initializer.density=1.5", "initializer.density must be in (0, 1]"),
    ("scheduler.eta_max=100000", "scheduler: alpha reaches 100000"),
    ("masking.grad_batches=0", "masking.grad_batches"),
    ("train.task_sampling=sometimes", "train.task_sampling"),
    ("scorer=nope", "Could not find 'scorer/nope'"),
    ("masking.granularity=channel", "masking.granularity='channel': expected one of"),
    ("masking.granularity=head", "masking.granularity=head: MultiTaskMLP declares no attention heads"),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, override, message):
    p = run("recipe=digits", "debug=smoke", override, f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout
    assert not (tmp_path / "metrics.jsonl").exists(), "training started"


def test_dry_run_prints_the_target_report(tmp_path):
    p = run("recipe=digits", "debug=smoke", "dry_run=true", f"hydra.run.dir={tmp_path}")
    assert "mask targets" in p.stdout and "body.0.weight" in p.stdout
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_digits_unit_granularity_smoke_and_export(tmp_path):
    d = tmp_path / "run"
    run("recipe=digits", "debug=smoke", "masking.granularity=unit", f"hydra.run.dir={d}")
    r = check_contract(d, "digits")
    masks, _, _ = read_masks_file(d / "masks.safetensors")
    # whole units: every row of the first layer's weight is all on or all off, in every task
    rows = masks["inp.weight"]
    assert bool(((rows.all(dim=2)) | (~rows.any(dim=2))).all())
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), str(d), "voting=0.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["params_exported"] < out["params_full"] and out["max_abs_diff"] <= 1e-5
    assert r["config"]["masking"]["granularity"] == "unit"
