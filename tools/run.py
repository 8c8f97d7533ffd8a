#!/usr/bin/env python
"""Run a recipe: ``python tools/run.py recipe=<name> [group=option ...] [key=value ...]``, the
same as ``maskmtl run ...``.

Options per group are listed in conf/ (one YAML per option); ``-m`` runs a multirun sweep. The
Hydra app (its ``@hydra.main``) is ``recipes.tools.run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.tools.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
