#!/usr/bin/env python
"""Export a finished run's structured mask as a smaller dense model: ``python tools/export.py
RUN_DIR task=NAME|group=G|voting=THRESH [out=DIR atol=X rtol=X]``, the same as ``maskmtl export``.

The code is ``recipes.tools.export`` (options, errors and exit statuses are described there).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.tools.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
