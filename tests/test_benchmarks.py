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
