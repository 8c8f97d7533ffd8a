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
