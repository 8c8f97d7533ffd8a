#!/usr/bin/env python
"""Report a sweep: ``python tools/report.py SWEEP [--rows KEYS] [--cols KEYS] [--metric NAME] ...``,
the same as ``maskmtl report ...``. The report itself is ``recipes.tools.report``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.tools.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
