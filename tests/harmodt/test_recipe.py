"""The harmodt recipe end to end on CPU: every method in a smoke run through the command line
(real Meta-World data made by the data recipe, real environments for evaluation), and a killed
run resumed from its checkpoint equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("metaworld")

from maskmtl import read_masks_file  # noqa: E402
from test_recipes import check_contract, finished_runs, killed_and_resumed, run, smoke_sweep  # noqa: E402

METHODS = ["prompt_dt", "mtdt", "harmodt_r", "harmodt_m", "harmodt_f"]


@pytest.mark.slow
def test_every_method_smoke(tmp_path):
    for _, r in smoke_sweep(tmp_path, METHODS):
        dense = r["method"] in ("prompt_dt", "mtdt")
        assert all(abs(x - (1.0 if dense else 0.8)) < 0.01 for x in r["density"])


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    common = ["recipe=harmodt", "debug=smoke", "train.steps=16", "train.checkpoint_every=4", "masking.update_every=3",
              "scheduler=constant", "scheduler.alpha=5", "train.eval_every=8", "train.task_sampling=uniform"]
    ra, rb = killed_and_resumed(common, tmp_path, 11)
    assert rb["resumed_from"] == 8
    assert ra["per_task"] == rb["per_task"] and ra["episodes"] == rb["episodes"] and ra["best"] == rb["best"]
    ma, mb = (read_masks_file(tmp_path / x / "masks.safetensors")[0] for x in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True)["model"] for x in "ab")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.slow
def test_unseen_tasks_are_evaluated_with_the_voting_mask(tmp_path):
    """ML45: after training, the held-out task is played with the voting mask of the training
    tasks' masks (all ones for a dense method), its prompt from its own demonstrations."""
    run("-m", "recipe=harmodt", "debug=smoke", "data=ml45_tiny", "method=prompt_dt,harmodt_f",
        f"hydra.sweep.dir={tmp_path}")
    seen = set()
    for d in finished_runs(tmp_path):
        r = json.loads((d / "results.json").read_text())
        u = r["unseen"]
        assert u["tasks"] == ["bin-picking-v3"] and "bin-picking-v3" not in r["tasks"]
        assert len(u["episodes"]) == 1 and 0.0 <= u["mean_success"] <= 1.0
        masks = read_masks_file(d / "masks.safetensors")[0]  # [tasks, *P] per target
        on = sum(int((m.sum(0) > 0.5 * m.shape[0]).sum()) for m in masks.values())
        total = sum(m[0].numel() for m in masks.values())
        assert u["voting_density"] == pytest.approx(on / total)
        assert (u["voting_density"] == 1.0) == (r["method"] == "prompt_dt")
        seen.add(r["method"])
    assert seen == {"prompt_dt", "harmodt_f"}


@pytest.mark.parametrize("overrides,message", [
    (["data=ml45_tiny", "method=mtdt"], "has no embedding for tasks it never trained on"),
    (["data=ml45_tiny", "data.prompt_demos=0"], "data.prompt_demos must be >= 1"),
    (["data.unseen_tasks=[dial-turn-v3]"], "are training tasks too"),
    (["data=ml45_tiny", "eval.voting_threshold=0"], "eval.voting_threshold=0"),
    (["data=ml45_tiny", "eval.voting_sweep=[0.8,0]"], "eval.voting_sweep=[0.8, 0]: 0 is not a fraction"),
    (["data=ml45_tiny", "eval.voting_sweep=0.8"], "eval.voting_sweep=0.8: expected a list"),
    (["method=ta_harmodt_gating"], "belongs to recipe=g_harmodt"),
    (["model.arch=rnn"], "model.arch='rnn': expected one of dt, mlp, mgdt, iql"),
    (["method=mtbc", "model.prompt=true"], "model.arch=mlp (MTBC's actor) takes no trajectory prompt"),
    (["method=mgdt", "model.task_id=true"], "model.arch=mgdt (multi-game DT) is conditioned on neither"),
    (["method=mtiql", "model.task_id=false"], "model.arch=iql (MTIQL) has a task-id actor"),
    (["method=mtiql", "iql.tau=1.5"], "iql.tau=1.5: expected a number in (0, 1)"),
    (["model.max_ep_len=10"], "model.max_ep_len=10: the timestep embedding needs a row for each"),
    (["method=mgdt", "model.return_bins=1"], "model.return_bins=1: expected an integer >= 2"),
])
def test_bad_config_fails_before_any_data_or_training(tmp_path, overrides, message):
    p = run("recipe=harmodt", "debug=smoke", *overrides, f"data_root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert p.returncode != 0 and message in p.stderr + p.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_head_granularity_smoke_and_export(tmp_path):
    """Structured masks end to end: heads + MLP units trained, then one task exported by the tool."""
    import subprocess
    import sys

    from maskmtl.export import read_export_meta
    from test_recipes import ROOT

    d = tmp_path / "run"
    # random initializer: ERK makes the small head family dense at this size
    run("recipe=harmodt", "debug=smoke", "masking.granularity=head", "initializer=random",
        "initializer.density=0.5", f"hydra.run.dir={d}")
    r = check_contract(d, "harmodt")
    assert r["config"]["masking"]["granularity"] == "head"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), str(d), f"task={r['tasks'][0]}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["params_exported"] < out["params_full"] and out["max_abs_diff"] <= 1e-5
    # 4 heads + 128 MLP units at density 0.5: 2 + 64 removed at the start; swaps keep the count
    assert sum(out["removed_heads"].values()) + sum(out["removed_units"].values()) == 66
    meta = read_export_meta(out["export"])
    assert meta["model_config"]["d_model"] == 32 and meta["source"]["task"] == r["tasks"][0]
