"""Dependency boundaries: the core never loads Meta-World code, and stored data loads and samples
without the simulator (only generation needs the ``rl`` extra)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _loaded_after(code: str) -> set[str]:
    probe = code + "; import sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_core_does_not_import_recipes():
    mods = _loaded_after("import maskmtl")
    assert not {m for m in mods if m.startswith(("recipes", "metaworld", "mujoco", "gymnasium"))}


def test_loading_and_sampling_need_no_simulator():
    mods = _loaded_after("import recipes.metaworld.storage, recipes.metaworld.readers, recipes.metaworld.sampler, "
                         "recipes.metaworld.make_data, recipes.metaworld.tasksets")
    assert not {m for m in mods if m.startswith(("metaworld", "mujoco", "gymnasium"))}


def test_minari_module_loads_minari_only_when_used():
    mods = _loaded_after("import recipes.metaworld.minari_format")
    assert not {m for m in mods if m.startswith(("metaworld", "mujoco", "gymnasium", "minari", "h5py"))}
