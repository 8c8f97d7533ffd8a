"""Run a recipe: ``maskmtl run recipe=<name> [group=option ...] [key=value ...]`` (or
``python tools/run.py ...``, the same arguments).

Hydra's command line: options per group are listed in the config folder (one YAML per option,
``recipes.tools.config_dir()``), ``-m`` runs a multirun sweep, ``--help`` / ``--cfg job`` /
``--shell-completion`` are Hydra's. Each job's composed config goes to ``recipes.launch.launch``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from recipes.tools import config_dir, exit_status


def task(cfg: DictConfig):
    """Hydra's task function: one job. A bad config or run folder is one line on stderr and exit
    status 2 (in a multirun the launcher records the failed job and reports it with the others)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from maskmtl.config import ConfigError
    from recipes.common import RunDirError
    from recipes.launch import launch

    try:
        return launch(cfg)
    except (ConfigError, RunDirError) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Hydra's command line on ``argv`` (default ``sys.argv[1:]``), with the root config; returns
    the exit status. ``sys.argv[0]`` is kept: Hydra's shell completion names the program by it."""
    import hydra

    # The job name Hydra records is this module's last part, "run", as it was for tools/run.py.
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(task)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "maskmtl", *(saved[1:] if argv is None else argv)]
    try:
        app()
    except SystemExit as e:
        return exit_status(e)
    finally:
        sys.argv = saved
    return 0
