"""Experiments as config (conf/experiment): how an experiment composes with the methods it sweeps
and with the command line, that every arm it sweeps passes every check before a run, and that it
belongs to the harmodt recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from maskmtl.config import ConfigError
from test_hardening import composed, prepared

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """The experiment's ``hydra.sweeper.params``: key -> the values it sweeps."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def scheduler(cfg) -> dict:
    return OmegaConf.to_container(cfg.scheduler, resolve=True)


def test_experiment_group_is_in_the_defaults_list_last_and_not_optional():
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults)
    groups = [d for d in defaults if isinstance(d, dict) and not next(iter(d)).startswith("override")]
    assert groups[-1] == {"experiment": None}  # last of the groups: its values win over theirs
    assert not any("optional" in next(iter(d)) and "experiment" in next(iter(d)) for d in groups)
    assert EXPERIMENTS and "evidence_mt10" in EXPERIMENTS


def test_a_mistyped_experiment_fails():
    with pytest.raises(HydraException, match="experiment/evidence_mt1"):
        composed(["experiment=evidence_mt1"])


def test_evidence_mt10_with_harmodt_f_composes_in_order():
    cfg, _, choices = composed(["experiment=evidence_mt10", "method=harmodt_f"])
    assert cfg.recipe_name == "harmodt" and cfg.method_name == "harmodt_f"
    assert choices["data"] == "tiny" and cfg.data.taskset == "MT10"
    # the method's groups ...
    assert cfg.initializer._target_.endswith("ERKInitializer") and cfg.scorer._target_.endswith("FisherScorer")
    # ... and the experiment's budget in the method's cosine schedule
    assert scheduler(cfg) == {"_target_": "maskmtl.schedulers.CosineScheduler", "unit": "share", "eta_min": 0,
                              "eta_max": 0.0083}
    assert cfg.eval.episodes == 10 and cfg.eval.seed == 100 and cfg.eval.heldout_batches == 8
    # the command line wins over both
    cfg2, _, _ = composed(["experiment=evidence_mt10", "method=harmodt_f", "scheduler.eta_max=0.02",
                           "eval.episodes=3", "eval.heldout_batches=2", "scorer=magnitude"])
    assert scheduler(cfg2)["eta_max"] == 0.02 and scheduler(cfg2)["unit"] == "share"
    assert cfg2.eval.episodes == 3 and cfg2.eval.heldout_batches == 2
    assert cfg2.scorer._target_.endswith("MagnitudeScorer")
    # without the experiment the schedule is the count default, untouched
    cfg3, _, _ = composed(["method=harmodt_f"])
    assert scheduler(cfg3) == {"_target_": "maskmtl.schedulers.CosineScheduler", "unit": "count", "eta_min": 0,
                               "eta_max": 100}
    assert "budget" not in cfg3 and cfg3.eval.heldout_batches == 4


def test_the_budget_reaches_only_the_methods_whose_masks_move():
    for method, scorer in (("harmodt_random", "RandomScorer"), ("harmodt_m", "MagnitudeScorer")):
        cfg, _, _ = composed(["experiment=evidence_mt10", f"method={method}"])
        assert cfg.scorer._target_.endswith(scorer) and cfg.initializer._target_.endswith("ERKInitializer")
        assert scheduler(cfg)["unit"] == "share" and scheduler(cfg)["eta_max"] == 0.0083
    for method, init in (("harmodt_r", "ERKInitializer"), ("prompt_dt", "DenseInitializer"),
                         ("mtdt", "DenseInitializer")):
        cfg, _, _ = composed(["experiment=evidence_mt10", f"method={method}"])
        assert scheduler(cfg) == {"_target_": "maskmtl.schedulers.ConstantScheduler", "alpha": 0}, method
        assert cfg.initializer._target_.endswith(init)
    cfg, _, _ = composed(["experiment=evidence_mt10", "method=mtdt"])
    assert cfg.model.task_id is True and cfg.model.prompt is False  # the method's own keys stay


def test_harmodt_random_is_harmodt_f_with_random_scores():
    f, _, _ = composed(["method=harmodt_f"])
    r, _, _ = composed(["method=harmodt_random"])
    assert r.scorer._target_ == "maskmtl.scorers.RandomScorer" and r.method_name == "harmodt_random"
    assert scheduler(r) == scheduler(f) and r.initializer == f.initializer


@pytest.mark.parametrize("base", ["mtbc", "mgdt", "mtiql"])
def test_each_baselines_control_is_its_masked_arm_with_random_scores(base):
    """X_random differs from X_harmodt_f in its scorer (and name) only: same model, masks and schedule."""
    f, _, _ = composed(["experiment=evidence_baselines", f"method={base}_harmodt_f"])
    r, _, _ = composed(["experiment=evidence_baselines", f"method={base}_random"])
    assert r.scorer._target_ == "maskmtl.scorers.RandomScorer" and r.method_name == f"{base}_random"
    assert f.scorer._target_ == "maskmtl.scorers.FisherScorer"
    rest = lambda c: {k: v for k, v in OmegaConf.to_container(c, resolve=True).items()  # noqa: E731
                      if k not in ("scorer", "method_name")}
    assert rest(r) == rest(f) and scheduler(r)["unit"] == "share"
    assert sweep_params("evidence_baselines")["method"][2::3] == ["mtbc_random", "mgdt_random", "mtiql_random"]


def test_evidence_mt10_sweeps_every_arm_and_seed():
    params = sweep_params("evidence_mt10")
    assert params["method"] == ["harmodt_r", "harmodt_random", "harmodt_m", "harmodt_f", "prompt_dt", "mtdt"]
    assert params["seed"] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_swept_arm_passes_every_check(experiment, tmp_path):
    params = sweep_params(experiment)
    methods = params.pop("method")
    for method in methods:
        seeds = params.get("seed", ["0"])
        for i, seed in enumerate(sorted({seeds[0], seeds[-1]})):
            out = tmp_path / f"{method}_{i}"
            entry, cfg = prepared([f"experiment={experiment}", f"method={method}", f"seed={seed}", "debug=smoke"],
                                  out)
            assert cfg.method_name == method and cfg.seed == int(seed) and callable(entry)
            assert (out / ".hydra" / "config.yaml").exists()  # every check passed: the run would start


@pytest.mark.parametrize("recipe,message", [
    ("digits", "experiment=evidence_mt10: recipe=digits has no use for the experiment group"),
    ("g_harmodt", "experiment=evidence_mt10: recipe=g_harmodt has no use for the experiment group"),
])
def test_evidence_mt10_belongs_to_the_harmodt_recipe(recipe, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prepared([f"recipe={recipe}", "experiment=evidence_mt10", "debug=smoke"], tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_profile_count_under_a_share_budget_is_refused(tmp_path):
    """profile=paper sets scheduler.eta_max as a count: with the experiment's share unit it is refused
    (not read as a share)."""
    with pytest.raises(ConfigError, match="scheduler.eta_max=100"):
        prepared(["experiment=evidence_mt10", "profile=paper", "debug=smoke"], tmp_path / "run")


def test_bad_share_budget_names_the_key(tmp_path):
    for bad, text in (("budget.eta_max=1.5", "scheduler.eta_max=1.5"), ("budget.unit=percent", "scheduler.unit"),
                      ("scheduler.eta_min=-0.1", "scheduler.eta_min=-0.1")):
        with pytest.raises(ConfigError, match=text.replace(".", r"\.")):
            prepared(["experiment=evidence_mt10", "debug=smoke", bad], tmp_path / "run")


@pytest.mark.slow
def test_one_arm_runs_with_the_share_budget(tmp_path):
    """harmodt_random under the experiment (smoke size): its one update swaps ⌈0.0083 · active⌉ entries
    per task, and the held-out loss is in results.json."""
    pytest.importorskip("metaworld")
    from maskmtl import read_masks_file
    from maskmtl.outputs import read_metrics

    d = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "experiment=evidence_mt10",
                        "method=harmodt_random", "debug=smoke", "threads=1", f"data_root={tmp_path / 'data'}",
                        f"hydra.run.dir={d}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    masks, _, _ = read_masks_file(d / "masks.safetensors")
    active = min(int(sum(m[g].sum() for m in masks.values())) for g in range(2))  # a swap keeps each group's count
    rows = [r for r in read_metrics(d / "metrics.jsonl") if "mask/alpha" in r]
    # debug=smoke: 20 steps, one update at step 10 = E/2, where α = η_max
    assert [r["step"] for r in rows] == [10] and rows[0]["mask/alpha"] == math.ceil(0.0083 * active)
    res = json.loads((d / "results.json").read_text())
    assert res["method"] == "harmodt_random" and res["options"]["experiment"] == "evidence_mt10"
    assert math.isfinite(res["heldout"]["mse"]) and "heldout_mse" in res["mean"]
