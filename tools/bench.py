#!/usr/bin/env python
"""Benchmarks: ``python tools/bench.py NAME [--key value ...]``.

Each benchmark measures against a baseline in the same run (these machines are shared and
noisy, so read ratios) and prints its figures as one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    result = getattr(importlib.import_module(module), func)(**opts)
    print(json.dumps({"benchmark": args.name, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
