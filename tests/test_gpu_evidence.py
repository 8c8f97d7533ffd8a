"""tools/gpu_evidence.sh, the prepared GPU comparison, end to end on the CPU at smoke size: data, the
packed sweep (2 at a time here instead of 16 on a GPU), and both report tables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("metaworld")
pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_evidence_script_runs_the_sweep_and_writes_both_reports(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PACK": "hydra.launcher.max_parallel=2", "SWEEP": str(sweep), "DATA_WORKERS": "1",
           "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_evidence.sh"), "debug=smoke", f"data_root={tmp_path / 'data'}",
                        "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10", "masking.update_every=10",
                        "train.warmup_steps=0", "model.n_layer=1", "train.batch_size=4", "seed=0,1",
                        "method=harmodt_f,harmodt_random"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "packing 4 jobs: 2 at once" in out and "warning: some runs failed" not in out
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 4
    reports = sorted((sweep / "reports").glob("report_*.md"))
    assert len(reports) == 2  # held-out loss and success, each paired against the random swaps
    text = "\n".join(r.read_text() for r in reports)
    assert "harmodt_random" in text and "heldout_mse" in text and "success" in text
    assert "done in" in p.stdout and str(sweep) in p.stdout
