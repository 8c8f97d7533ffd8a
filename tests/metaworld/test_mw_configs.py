"""Every conf/data option composes (alone and under recipe=make_data) and builds its specs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipes.metaworld.generate import GenerationSpec
from recipes.metaworld.make_data import dataset_dir, dataset_tasks
from recipes.metaworld.sampler import SamplingConfig

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# Meta-World options; the locomotion ones (benchmark: locomotion) are checked below and in tests/locomotion.
LOCOMOTION_OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if "benchmark: locomotion" in p.read_text())
DATA_OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem not in LOCOMOTION_OPTIONS)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_options_exist():
    assert {"tiny", "mt10_near", "mt10_sub"} <= set(DATA_OPTIONS)


@pytest.mark.parametrize("option", DATA_OPTIONS)
@pytest.mark.parametrize("recipe", ["make_data", "digits"])
def test_data_option_composes(option, recipe):
    cfg = _compose([f"recipe={recipe}", f"data={option}"])
    spec = GenerationSpec.from_config(cfg.data)
    sampling = SamplingConfig.from_config(cfg.data.sampling)
    tasks = dataset_tasks(cfg.data)
    assert tasks and spec.n_episodes > sampling.heldout_episodes
    assert dataset_dir(cfg.data, cfg.data_root).parent == REPO / "data" / "metaworld"


@pytest.mark.parametrize("option", LOCOMOTION_OPTIONS)
@pytest.mark.parametrize("recipe", ["make_data", "digits"])
def test_locomotion_data_option_composes(option, recipe):
    from recipes.locomotion.make_data import check_data_config, dataset_dir as loco_dir

    cfg = _compose([f"recipe={recipe}", f"data={option}"])
    split = check_data_config(cfg.data)
    assert split.family == option and split.train and split.episodes_per_task >= 1
    assert loco_dir(cfg.data, cfg.data_root).parent == REPO / "data" / "locomotion"


def test_locomotion_options_exist():
    assert LOCOMOTION_OPTIONS == ["ant_dir", "cheetah_dir", "cheetah_vel"]


def test_make_data_default_is_tiny_and_near_sub_share_schedule():
    assert _compose(["recipe=make_data"]).data == _compose(["recipe=make_data", "data=tiny"]).data
    near, sub = (GenerationSpec.from_config(_compose([f"data={o}"]).data) for o in ("mt10_near", "mt10_sub"))
    assert near.n_episodes == 2 * sub.n_episodes and near.curriculum == sub.curriculum and near.seed == sub.seed
    assert dataset_dir(_compose(["data=mt10_near"]).data, "data") != dataset_dir(_compose(["data=mt10_sub"]).data, "data")


def test_digits_unchanged_without_data():
    cfg = _compose(["recipe=digits"])
    assert cfg.recipe_name == "digits" and dict(cfg.data) == {"test_fraction": 0.25}


@pytest.mark.slow
def test_make_data_recipe_end_to_end(tmp_path):
    """``tools/run.py recipe=make_data debug=smoke`` generates two small tasks, then a rerun reuses them."""
    pytest.importorskip("metaworld")
    args = [sys.executable, str(REPO / "tools" / "run.py"), "recipe=make_data", "debug=smoke",
            f"data_root={tmp_path / 'data'}"]
    for run in ("first", "second"):
        out = subprocess.run(args + [f"hydra.run.dir={tmp_path / run}"], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((tmp_path / run / "data_summary.json").read_text())
        assert summary["tasks"] == ["basketball-v3", "bin-picking-v3"] and summary["transitions_per_task"] == [200]
        assert summary["bytes_on_disk"] > 0 and 0.0 <= summary["success_rate"] <= 1.0
        assert summary["demonstrations"]["per_task"] == 1 and summary["demonstrations"]["bytes_on_disk"] > 0
    assert summary["tasks_reused"] == ["basketball-v3", "bin-picking-v3"]
