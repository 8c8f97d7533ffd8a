"""g_harmodt stopped after its training loop (before the gate trained after it, and with the figures
written but not results.json): the rerun resumes at the last step and ends as an uninterrupted run,
its metrics log holding each row once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipes import run as run_tool

from maskmtl.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["recipe=g_harmodt", "debug=smoke", "threads=1", "train.steps=12", "grouping.warmup_steps=4",
          "train.checkpoint_every=6", "masking.update_every=3", "train.eval_every=6", "gate.steps=20"]


def run(*args: str, env: dict | None = None):
    """tools/run.py with these arguments; the caller checks the exit status."""
    return run_tool(*args, env=env, check=False)


def logged(d: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(d / "metrics.jsonl")]


@pytest.mark.slow
def test_stopped_after_training_resumes_at_the_last_step(tmp_path):
    ref = tmp_path / "ref"
    p = run(*COMMON, f"hydra.run.dir={ref}")
    assert p.returncode == 0, p.stderr[-3000:]
    ra = json.loads((ref / "results.json").read_text())
    for point in ("final_eval", "figures"):
        d = tmp_path / point
        killed = run(*COMMON, f"hydra.run.dir={d}", env={"MASKMTL_KILL_AT_STEP": point})
        assert killed.returncode != 0 and not (d / "results.json").exists()
        p = run(*COMMON, f"hydra.run.dir={d}")
        assert p.returncode == 0, p.stderr[-3000:]
        rb = json.loads((d / "results.json").read_text())
        assert rb["resumed_from"] == 12
        for key in ("per_task", "episodes", "predictions", "task_to_group", "gate", "best_id"):
            assert ra[key] == rb[key], (point, key)
        assert logged(ref) == logged(d), point
        assert (d / "gate.png").exists() and (d / "curves.png").exists()
