"""The g_harmodt recipe's methods compose to the protocol each one names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[2] / "conf"

EXPECT = {  # method: (gate.target, grouper, initializer)
    "g_harmodt": ("group", "KNNGrouper", "ERKInitializer"),
    "ta_harmodt": ("none", "NoneGrouper", "ERKInitializer"),
    "ta_harmodt_gating": ("task", "NoneGrouper", "ERKInitializer"),
    "ta_prompt_dt": ("none", "NoneGrouper", "DenseInitializer"),
    "ta_prompt_dt_gating": ("task", "NoneGrouper", "DenseInitializer"),
    "ta_mtdt": ("none", "NoneGrouper", "DenseInitializer"),
    "ta_mtdt_gating": ("task", "NoneGrouper", "DenseInitializer"),
}


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("method", [None, *EXPECT])
def test_methods_compose(method):
    cfg = compose_cfg("recipe=g_harmodt", *([f"method={method}"] if method else []))
    name = method or "g_harmodt"
    target, grouper, init = EXPECT[name]
    assert cfg.method_name == name and cfg.gate.target == target
    assert cfg.grouper._target_.endswith(grouper) and cfg.initializer._target_.endswith(init)
    mtdt = "mtdt" in name
    assert cfg.data.sampling.state_norm == "all" and cfg.model.prompt != mtdt and cfg.model.task_id == mtdt


def test_command_line_beats_method():
    cfg = compose_cfg("recipe=g_harmodt", "method=g_harmodt", "grouper.n_groups=3", "gate.schedule=simultaneous")
    assert cfg.grouper.n_groups == 3 and cfg.gate.schedule == "simultaneous"
