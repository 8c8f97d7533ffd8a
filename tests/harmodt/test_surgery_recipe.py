"""MTDT + gradient surgery in the harmodt recipe (train.gradient=mean|pcgrad|cagrad): smoke runs
through the command line, errors before training, and a killed PCGrad run resumed to the same end."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("metaworld")

from maskmtl.outputs import read_metrics  # noqa: E402
from test_recipes import check_contract, finished_runs, killed_and_resumed, run  # noqa: E402

SURGERY = ["mtdt_mean", "pcgrad", "cagrad"]


@pytest.mark.slow
def test_surgery_methods_smoke(tmp_path):
    run("-m", "recipe=harmodt", "debug=smoke", f"method={','.join(SURGERY)}", f"hydra.sweep.dir={tmp_path}")
    seen = set()
    for d in finished_runs(tmp_path):
        r = check_contract(d, "harmodt")
        seen.add(r["method"])
        assert r["steps"] == 20 and r["config"]["train"]["gradient"] == {"mtdt_mean": "mean"}.get(r["method"], r["method"])
        assert r["config"]["model"]["task_id"] and not r["config"]["model"]["prompt"]
        assert all(x == 1.0 for x in r["density"])
        rows = [row for row in read_metrics(d / "metrics.jsonl") if "train/loss" in row]
        assert rows and all(0.0 <= row["train/conflict_pairs"] <= 1.0 for row in rows)
    assert seen == set(SURGERY)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,match", [
    (["method=pcgrad", "train.cagrad_c=1.5"], "train.cagrad_c"),
    (["method=mtdt", "train.tasks_per_step=2"], "train.tasks_per_step"),
    (["method=pcgrad", "train.tasks_per_step=3"], "train.tasks_per_step=3: expected at most"),
    (["method=harmodt_f", "train.gradient=cagrad"], "all-ones masks"),
])
def test_bad_surgery_config_fails_before_training(tmp_path, overrides, match):
    p = run("recipe=harmodt", "debug=smoke", *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode != 0 and match in p.stderr + p.stdout
    assert "train: step" not in p.stdout


@pytest.mark.slow
def test_pcgrad_kill_and_resume_equals_uninterrupted(tmp_path):
    common = ["recipe=harmodt", "debug=smoke", "method=pcgrad", "train.steps=16", "train.checkpoint_every=4",
              "train.eval_every=8"]
    ra, rb = killed_and_resumed(common, tmp_path, 11)
    assert rb["resumed_from"] == 8
    assert ra["per_task"] == rb["per_task"] and ra["episodes"] == rb["episodes"] and ra["best"] == rb["best"]
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True) for x in "ab")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    # PCGrad's order generator is checkpointed and was restored: after 16 steps both runs hold the
    # same state (a resumed run that restarted the stream would be 8 steps of draws behind)
    ga, gb = ca["rng"]["generators"]["surgery"], cb["rng"]["generators"]["surgery"]
    assert torch.equal(ga, gb)
    assert not torch.equal(ga, torch.Generator().manual_seed(5).get_state())
