#!/usr/bin/env python
"""Run a recipe: ``python tools/run.py recipe=<name> [group=option ...] [key=value ...]``.

Options per group are listed in conf/ (one YAML per option); ``-m`` runs a multirun sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.utils import get_method

    from maskmtl.config import ConfigError

    try:
        entry = get_method(cfg.entry)
    except Exception as e:
        raise ConfigError(f"entry={cfg.entry!r} (set by recipe={cfg.recipe_name}) cannot be imported: {e}") from e
    return entry(cfg)


if __name__ == "__main__":
    main()
