"""Layer 1: every recipe composes with every option of every group, and the groups instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from maskmtl.config import ConfigError, build

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["scorer", "scheduler", "initializer", "grouper"]
OVERLAYS = ["variant", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


RECIPES = options("recipe")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_group_has_options():
    for g in GROUPS + OVERLAYS + ["recipe"]:
        assert options(g), f"conf/{g} has no options"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_recipe_option_composes_and_instantiates(recipe, group, option):
    cfg = compose_cfg(f"recipe={recipe}", f"{group}={option}")
    assert OmegaConf.select(cfg, "recipe_name") == recipe
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    obj = build(cfg[group], group, **({"total_steps": 100} if group == "scheduler" else {}))
    assert type(obj).__name__ == cfg[group]._target_.rsplit(".", 1)[1]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("overlay,option", [(g, o) for g in OVERLAYS for o in options(g)])
def test_recipe_overlays_compose(recipe, overlay, option):
    cfg = compose_cfg(f"recipe={recipe}", f"{overlay}={option}")
    assert cfg.recipe_name == recipe
    if overlay == "debug":
        assert cfg.smoke is True and cfg.device == "cpu"
    if (overlay, option) == ("variant", "dense"):
        assert cfg.initializer._target_.endswith("DenseInitializer") and cfg.scheduler.alpha == 0


def test_command_line_group_choice_beats_variant():
    cfg = compose_cfg("recipe=digits", "variant=frozen", "initializer=random")
    assert cfg.initializer._target_.endswith("RandomInitializer") and cfg.scheduler.alpha == 0


@pytest.mark.parametrize("node,key,match", [
    ({"_target_": "maskmtl.initializers.ERKInitializer", "density": 1.5}, "initializer", "initializer.density"),
    ({"_target_": "maskmtl.initializers.RandomInitializer", "density": 0.0}, "initializer", "initializer.density"),
    ({"_target_": "maskmtl.schedulers.CosineScheduler", "eta_max": -1}, "scheduler", "scheduler.eta_max"),
    ({"_target_": "maskmtl.scorers.FisherScorer", "weighting": "mine"}, "scorer", "scorer.weighting"),
    ({"_target_": "maskmtl.groupers.KNNGrouper", "algorithm": "dbscan"}, "grouper", "grouper.algorithm"),
    ({"_target_": "maskmtl.scorers.FisherScorer", "lamda": 1}, "scorer", "scorer"),
])
def test_bad_values_name_their_key(node, key, match):
    with pytest.raises(ConfigError, match=match):
        build(OmegaConf.create(node), key, **({"total_steps": 10} if key == "scheduler" else {}))


def test_unknown_option_is_refused():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="scorer"):
        compose_cfg("scorer=nope")


@pytest.mark.parametrize("overlay,option", [(g, o) for g in ("method", "profile") for o in options(g)])
def test_harmodt_overlays_compose(overlay, option):
    cfg = compose_cfg("recipe=harmodt", f"{overlay}={option}")
    if overlay == "method":
        assert cfg.method_name == option
        arch = {"mtbc": "mlp", "mgdt": "mgdt", "mtiql": "iql"}.get(option.split("_")[0], "dt")
        assert cfg.model.arch == arch
        # task id, no prompt (MTDT's family, MTBC's and MTIQL's actors); MGDT has neither
        mtdt = option in ("mtdt", "mtdt_mean", "pcgrad", "cagrad", "ta_mtdt", "ta_mtdt_gating") or arch in ("mlp", "iql")
        assert cfg.model.task_id == mtdt and cfg.model.prompt == (not mtdt and arch != "mgdt")
        dense = option in ("prompt_dt", "mtdt", "mtdt_mean", "pcgrad", "cagrad", "mtbc", "mgdt", "mtiql", "ta_mtdt",
                           "ta_mtdt_gating", "ta_prompt_dt", "ta_prompt_dt_gating")
        assert cfg.initializer._target_.endswith("DenseInitializer") == dense, cfg.initializer
        assert cfg.train.gradient == {"mtdt_mean": "mean", "pcgrad": "pcgrad", "cagrad": "cagrad"}.get(option, "plain")
    for group in GROUPS:
        build(cfg[group], group, **({"total_steps": 100} if group == "scheduler" else {}))


@pytest.mark.parametrize("method,arch", [("mtbc", "mlp"), ("mgdt", "mgdt"), ("mtiql", "iql")])
def test_baseline_takes_any_masks_from_the_command_line(method, arch):
    """Masks on a dense baseline by group choice: HarmoDT-R's frozen random masks on its model."""
    cfg = compose_cfg("recipe=harmodt", f"method={method}", "initializer=random", "scheduler=frozen")
    assert cfg.model.arch == arch and cfg.method_name == method
    assert cfg.initializer._target_.endswith("RandomInitializer") and cfg.scheduler.alpha == 0
