"""The harmodt recipe end to end on CPU: every method in a smoke run through the command line
(real Meta-World data made by the data recipe, real environments for evaluation), and a killed
run resumed from its checkpoint equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("metaworld")

from maskmtl import read_masks_file  # noqa: E402
from test_recipes import check_contract, run  # noqa: E402

METHODS = ["prompt_dt", "mtdt", "harmodt_r", "harmodt_m", "harmodt_f"]


@pytest.mark.slow
def test_every_method_smoke(tmp_path):
    run("-m", "recipe=harmodt", "debug=smoke", f"method={','.join(METHODS)}", f"hydra.sweep.dir={tmp_path}")
    seen = set()
    for d in (p for p in tmp_path.iterdir() if (p / "results.json").exists()):
        r = check_contract(d, "harmodt")
        seen.add(r["method"])
        assert r["steps"] == 20 and len(r["episodes"]) == len(r["tasks"])
        assert all(0.0 <= v["success"] <= 1.0 for v in r["per_task"].values())
        dense = r["method"] in ("prompt_dt", "mtdt")
        assert all(abs(x - (1.0 if dense else 0.8)) < 0.01 for x in r["density"])
    assert seen == set(METHODS)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    common = ["recipe=harmodt", "debug=smoke", "train.steps=16", "train.checkpoint_every=4", "masking.update_every=3",
              "scheduler=constant", "scheduler.alpha=5", "train.eval_every=8", "train.task_sampling=uniform"]
    run(*common, f"hydra.run.dir={tmp_path / 'a'}")
    killed = run(*common, f"hydra.run.dir={tmp_path / 'b'}", env={"MASKMTL_KILL_AT_STEP": "11"}, check=False)
    assert killed.returncode != 0 and not (tmp_path / "b" / "results.json").exists()
    run(*common, f"hydra.run.dir={tmp_path / 'b'}")
    ra, rb = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    assert rb["resumed_from"] == 8
    assert ra["per_task"] == rb["per_task"] and ra["episodes"] == rb["episodes"] and ra["best"] == rb["best"]
    ma, mb = (read_masks_file(tmp_path / x / "masks.safetensors")[0] for x in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True)["model"] for x in "ab")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


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
