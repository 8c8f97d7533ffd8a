#!/usr/bin/env python
"""Benchmarks: ``python tools/bench.py NAME [key=value ...]``, the same as ``maskmtl bench``.

The table of names is ``recipes.tools.bench.BENCHMARKS``; the benchmarks are in ``benchmarks/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.tools.bench import BENCHMARKS, main  # noqa: E402, F401  (BENCHMARKS: tests read the table here)

if __name__ == "__main__":
    sys.exit(main())
