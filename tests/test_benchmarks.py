"""Every name in ``tools/bench.py``'s table resolves to a function of the ``benchmarks`` package."""

import importlib
import importlib.util
from pathlib import Path

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
