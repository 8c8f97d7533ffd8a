"""The g_harmodt recipe end to end on CPU: every method in a smoke run through the command line (real
Meta-World data and environments), kill-and-resume across each stage boundary equal to an
uninterrupted run, one group per task equal to HarmoDT+gating, and bad config refused before
training."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("metaworld")

from maskmtl import read_masks_file  # noqa: E402
from test_recipes import check_contract, finished_runs, run  # noqa: E402

METHODS = ["g_harmodt", "ta_harmodt", "ta_harmodt_gating", "ta_prompt_dt", "ta_prompt_dt_gating", "ta_mtdt",
           "ta_mtdt_gating"]


@pytest.mark.slow
def test_every_method_smoke(tmp_path):
    run("-m", "recipe=g_harmodt", "debug=smoke", f"method={','.join(METHODS)}", f"hydra.sweep.dir={tmp_path}")
    seen = set()
    for d in finished_runs(tmp_path):
        r = check_contract(d, "g_harmodt")
        seen.add(r["method"])
        assert r["protocol"] == "task_agnostic" and r["steps"] == 20 and len(r["tasks"]) == 4
        assert len(r["episodes"]) == len(r["predictions"]) == 4
        assert all(0.0 <= v["success"] <= 1.0 and 0.0 <= v["success_id"] <= 1.0 for v in r["per_task"].values())
        gated = r["method"].endswith("gating") or r["method"] == "g_harmodt"
        assert (r["gate"] is not None) == gated
        if gated:
            assert 0.0 <= r["gate"]["heldout"]["overall"] <= 1.0 and (d / "gate.png").exists()
            assert all(p["label"] >= 0 for p in r["predictions"])
        else:
            assert all(p["label"] == -1 for p in r["predictions"])
        if r["method"] == "g_harmodt":  # grouped: 2 groups (smoke cap), recorded, exact density
            assert r["n_groups"] == 2 and sorted(set(r["task_to_group"])) == [0, 1]
            assert r["grouping"]["step"] == 10 and (d / "grouping.png").exists()
            g = json.loads((d / "grouping.json").read_text())
            assert g["task_to_group"] == r["task_to_group"] and len(g["cosine_distance"]) == 4
            assert set(r["gate"]["labels"]) == {"0", "1"}
        else:
            assert r["n_groups"] == 4 and r["grouping"] is None
        dense = "prompt_dt" in r["method"] or "mtdt" in r["method"]
        assert all(abs(x - (1.0 if dense else 0.8)) < 0.01 for x in r["density"])
    assert seen == set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["after", "simultaneous"])
def test_kill_and_resume_across_stages_equals_uninterrupted(tmp_path, schedule):
    # warm-up steps 1-6, grouping at step 6, grouped training 7-16 with updates every 3 steps
    common = ["recipe=g_harmodt", "debug=smoke", "train.steps=16", "grouping.warmup_steps=6",
              "train.checkpoint_every=4", "masking.update_every=3", "scheduler=constant", "scheduler.alpha=5",
              "train.eval_every=8", "train.task_sampling=uniform", f"gate.schedule={schedule}", "gate.steps=30"]
    run(*common, f"hydra.run.dir={tmp_path / 'a'}")
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    for kill, resumed in (("7", 4), ("11", 8)):  # killed just after grouping (resumes in warm-up), then in stage 3
        d = tmp_path / f"k{kill}"
        killed = run(*common, f"hydra.run.dir={d}", env={"MASKMTL_KILL_AT_STEP": kill}, check=False)
        assert killed.returncode != 0 and not (d / "results.json").exists()
        run(*common, f"hydra.run.dir={d}")
        rb = json.loads((d / "results.json").read_text())
        assert rb["resumed_from"] == resumed
        for key in ("per_task", "episodes", "predictions", "task_to_group", "gate", "best_id"):
            assert ra[key] == rb[key], key
        ma, mb = (read_masks_file(x / "masks.safetensors")[0] for x in (tmp_path / "a", d))
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
        ca, cb = (torch.load(x / "checkpoint.pt", weights_only=True)["model"] for x in (tmp_path / "a", d))
        assert all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.slow
def test_one_group_per_task_is_harmodt_with_gating(tmp_path):
    # with 4 smoke tasks, grouper=knn with N^G = N never groups: the same run as grouper=none
    common = ["recipe=g_harmodt", "debug=smoke", "method=ta_harmodt_gating", "gate.steps=20", "train.eval_every=0"]
    run(*common, f"hydra.run.dir={tmp_path / 'a'}")
    run(*common, "grouper=knn", "grouper.n_groups=4", "gate.target=group", f"hydra.run.dir={tmp_path / 'b'}")
    ra, rb = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    assert ra["per_task"] == rb["per_task"] and ra["predictions"] == rb["predictions"]
    assert ra["gate"]["heldout"] == rb["gate"]["heldout"] and rb["task_to_group"] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("override,match", [
    ("gate.probe_steps=3", "gate.probe_steps=3: expected >= gate.transitions=5"),
    ("gate.target=oracle", "gate.target='oracle': expected one of"),
    ("data.sampling.state_norm=task", "data.sampling.state_norm=task"),
    ("method=harmodt_f", "method=harmodt_f"),
    ("gate.blind=empty model.task_id=true model.prompt=false", "gate.blind=empty"),
    ("grouping.warmup_steps=0", "grouping.warmup_steps=0: expected 0 < warmup"),
    ("gate.heldout_episodes=4", "gate.heldout_episodes=4: task basketball-v3 has 4 episodes"),
    ("grouper.n_groups=5 data.tasks=[reach-v3,push-v3,pick-place-v3]", "n_groups=5 exceeds the number of tasks"),
])
def test_bad_config_fails_before_training(tmp_path, override, match):
    # smoke caps N^G at 2, so the group count is checked on the full profile (it fails before any data is made)
    smoke = [] if "n_groups" in override else ["debug=smoke"]
    p = run("recipe=g_harmodt", *smoke, *override.split(), f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode != 0 and match in p.stderr + p.stdout, p.stderr[-2000:]
    assert "train:" not in p.stdout
