"""recipe=harmodt on the locomotion data end to end (smoke size, through the command line): each
family trains and is evaluated by return, unseen tasks with the voting mask, and a killed run
resumed from its checkpoint equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gymnasium")

from maskmtl import read_masks_file  # noqa: E402
from test_recipes import check_contract, finished_runs, killed_and_resumed, run  # noqa: E402

# per family: the methods run, and the unseen task of its smoke size (Cheetah-dir has none)
FAMILIES = {"cheetah_vel": (["prompt_dt", "harmodt_f"], ["cheetah_vel-2"]),
            "cheetah_dir": (["mtdt", "harmodt_f"], []),
            "ant_dir": (["prompt_dt", "harmodt_f"], ["ant_dir-6"])}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_smoke_scored_by_return(family, tmp_path):
    methods, unseen = FAMILIES[family]
    run("-m", "recipe=harmodt", "debug=smoke", f"data={family}", f"method={','.join(methods)}",
        f"data_root={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'runs'}", "eval.voting_sweep=[0.5,0.4]")
    seen = set()
    for d in finished_runs(tmp_path / "runs"):
        r = check_contract(d, "harmodt")
        seen.add(r["method"])
        assert r["benchmark"] == "locomotion" and r["headline"]["name"] == "return"
        assert r["tasks"] == [f"{family}-0", f"{family}-1"] and r["config"]["eval"]["max_steps"] == 10
        assert all(set(v) == {"return", "best_return", "heldout_mse"} for v in r["per_task"].values())
        assert r["headline"]["value"] == pytest.approx(sum(v["return"] for v in r["per_task"].values()) / 2)
        assert len(r["episodes"]) == 2 and all(e["success"] is None and 1 <= e["steps"] <= 10 for e in r["episodes"])
        for t, v in r["per_task"].items():
            assert v["return"] == pytest.approx(next(e["ret"] for e in r["episodes"] if e["task"] == t))
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert any("eval/mean_return" in row for row in rows) and not any("eval/mean_success" in row for row in rows)
        u = r["unseen"]
        if not unseen:
            assert u is None
            continue
        assert u["tasks"] == unseen and set(u["per_task"]) == set(unseen) and len(u["episodes"]) == 1
        assert u["mean_return"] == pytest.approx(u["episodes"][0]["ret"])
        masks = read_masks_file(d / "masks.safetensors")[0]  # the voting mask: entries most training masks keep
        on = sum(int((m.sum(0) > 0.5 * m.shape[0]).sum()) for m in masks.values())
        assert u["voting_density"] == pytest.approx(on / sum(m[0].numel() for m in masks.values()))
        assert (u["voting_density"] == 1.0) == (r["method"] == "prompt_dt")
        # eval.voting_sweep: 0.5 again plays the same mask on the same goals; 0.4 (more than 0.8 of 2 tasks)
        # is the union of the two masks
        again, union = u["sweep"]
        assert again["voting_threshold"] == 0.5 and again["per_task"] == u["per_task"]
        on = sum(int((m.sum(0) > 0.4 * m.shape[0]).sum()) for m in masks.values())
        assert union["voting_density"] == pytest.approx(on / sum(m[0].numel() for m in masks.values()))
        assert union["voting_density"] >= u["voting_density"]
        assert r["mean"]["unseen_return"] == u["mean_return"] and r["mean"]["unseen_density"] == u["voting_density"]
        assert r["mean"]["unseen_return@0.4"] == union["mean_return"]
        assert r["mean"]["unseen_density@0.4"] == union["voting_density"]
    assert seen == set(methods)


@pytest.mark.slow
def test_locomotion_kill_and_resume_equals_uninterrupted(tmp_path):
    common = ["recipe=harmodt", "debug=smoke", "data=cheetah_vel", f"data_root={tmp_path / 'data'}", "train.steps=16",
              "train.checkpoint_every=4", "masking.update_every=3", "scheduler=constant", "scheduler.alpha=5",
              "train.eval_every=8", "train.task_sampling=uniform"]
    ra, rb = killed_and_resumed(common, tmp_path, 11)
    assert rb["resumed_from"] == 8
    for key in ("per_task", "episodes", "best", "unseen", "density", "rtg_target"):
        assert ra[key] == rb[key], key
    ma, mb = (read_masks_file(tmp_path / x / "masks.safetensors")[0] for x in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True)["model"] for x in "ab")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
