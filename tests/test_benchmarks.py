"""Every name in ``tools/bench.py``'s table resolves to a function of the ``benchmarks`` package."""

import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_resolves():
    spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, entry in tool.BENCHMARKS.items():
        module, func = entry.split(":")
        assert module.startswith("benchmarks."), name
        assert callable(getattr(importlib.import_module(module), func)), name


def test_eval_benchmark_pairs_the_policy_implementations():
    """The eval benchmark runs every policy implementation on the same grid (a tiny one here) and
    reports each one's rate and its ratio to the reference; nothing is asserted about speed."""
    import math

    import pytest

    pytest.importorskip("metaworld")
    from benchmarks.harmodt import eval as bench_eval

    out = bench_eval(n_tasks=2, parallel=1, steps=3, d_model=16, n_layer=1, context=4, prompt_length=2, threads=1,
                     policy_impl="reference,cached,cached_loop", sequential=False)
    assert out["reference_vs_reference"] == 1.0
    for impl in ("reference", "cached", "cached_loop"):
        assert out[f"{impl}_env_steps_per_s"] > 0 and 0 < out[f"{impl}_policy_share"] < 1
    assert math.isfinite(out["cached_vs_reference"]) and math.isfinite(out["cached_loop_vs_reference"])


def test_mask_update_benchmark_reports_memory_per_float_cache():
    """The mask-update benchmark's memory figures (Linux): the float masks of every group (all) or one
    (group), and the update's peak above the trained state, which is not negative."""
    pytest.importorskip("resource")
    from benchmarks.core import mask_update

    out = {mode: mask_update(d_model=16, n_layer=1, batch=2, seq=8, n_tasks=4, reps=2, alpha=5, float_cache=mode)
           for mode in ("all", "group")}
    for mode, r in out.items():
        assert r["float_cache"] == mode and r["update_peak_above_mb"] >= 0 and r["update_s"] > 0
    entries = out["all"]["maskable"]
    assert out["all"]["float_cache_mb"] == pytest.approx(4 * 4 * entries / 2**20)   # 4 groups x fp32
    assert out["group"]["float_cache_mb"] == pytest.approx(4 * entries / 2**20)     # one group
