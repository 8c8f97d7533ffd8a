"""The command-line tools behind ``maskmtl run|export|bench`` (``recipes.cli``) and the scripts
``tools/run.py``, ``tools/export.py`` and ``tools/bench.py``, which call them.

Where the root config is: a checkout keeps it in ``conf/`` next to the ``recipes`` package (an
editable install, ``PYTHONPATH``, ``python tools/run.py``); a built wheel ships the same folder as
the package data ``recipes/conf/`` (``[tool.setuptools.package-dir]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the recipes package folder (the tools are not the core's)
ROOT = PACKAGE.parent  # a checkout's root when maskmtl runs from one; site-packages when installed


def config_dir() -> Path:
    """The folder holding the root ``config.yaml`` and one folder per config group: the installed
    copy ``recipes/conf/`` when there is one (it exists only in an installed wheel), else the
    checkout's ``conf/``."""
    for d in (PACKAGE / "conf", ROOT / "conf"):
        if (d / "config.yaml").is_file():
            return d
    raise FileNotFoundError(f"maskmtl's config folder is missing: neither {PACKAGE / 'conf'} (an installed "
                            f"package) nor {ROOT / 'conf'} (a checkout) holds config.yaml; reinstall maskmtl")


def exit_status(e: SystemExit) -> int:
    """The status the interpreter would exit with for ``e`` (a message is printed, status 1)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
