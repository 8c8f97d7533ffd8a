"""Benchmarks: ``maskmtl bench NAME [key=value ...]`` (or ``python tools/bench.py NAME ...``).

Each benchmark measures against a baseline in the same run (these machines are shared and
noisy, so read ratios) and prints its figures as one JSON object on its last line. The
benchmarks themselves live in the checkout's ``benchmarks/`` package, which is not installed with
maskmtl: they run from a checkout (an editable install, or ``python tools/bench.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from recipes.tools import ROOT

# name -> "module:function"; the function takes the parsed extra options (dict) and returns a dict.
BENCHMARKS = {
    "masked-step": "benchmarks.harmodt:masked_step",      # the Prompt-DT (issue 7's model)
    "mask-update": "benchmarks.harmodt:mask_update",      # the Prompt-DT, 50 tasks
    "masked-step-generic": "benchmarks.core:masked_step",  # a generic transformer, core only
    "mask-update-generic": "benchmarks.core:mask_update",
    "score-stability": "benchmarks.digits:score_stability",
    "sampler": "benchmarks.metaworld:sampler",
    "eval": "benchmarks.harmodt:eval",
    "surgery-step": "benchmarks.harmodt:surgery_step",  # MTDT + mean / PCGrad / CAGrad vs an MTDT step
    "export": "benchmarks.harmodt:export",               # pruned per-task Prompt-DT vs masked full model
}


class BenchmarksMissing(RuntimeError):
    """maskmtl is installed without a checkout: there is no ``benchmarks`` package to run."""


def benchmark_module(name: str):
    """The ``benchmarks.*`` module ``name``, from the checkout maskmtl runs from."""
    if (ROOT / "benchmarks" / "__init__.py").is_file() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
        raise BenchmarksMissing(f"the benchmarks run from a checkout of the maskmtl repository: its benchmarks/ "
                                f"package is not installed with maskmtl, and {ROOT} holds none (clone the "
                                f"repository, `pip install -e .` there, then `maskmtl bench` or "
                                f"`python tools/bench.py`)") from None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("options", nargs="*", help="key=value options passed to the benchmark")
    args = p.parse_args(argv)
    opts = {}
    for kv in args.options:
        if "=" not in kv:
            p.error(f"option {kv!r}: expected key=value")
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    module, func = BENCHMARKS[args.name].split(":")
    try:
        bench = getattr(benchmark_module(module), func)
    except BenchmarksMissing as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    result = bench(**opts)
    print(json.dumps({"benchmark": args.name, **result}))
    return 0
