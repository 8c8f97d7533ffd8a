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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from maskmtl.config import ConfigError
    from recipes.common import RunDirError
    from recipes.launch import launch

    try:
        return launch(cfg)
    except (ConfigError, RunDirError) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records the failed job and reports it with the others
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
