"""Where a run's metrics go besides ``metrics.jsonl``: the ``logger`` config group.

``metrics.jsonl`` is always written and stays the record the report, the resume logic and the
results read. Other sinks mirror it:

- ``logger=tensorboard``: TensorBoard event files in ``<run>/tensorboard/``, one scalar per
  metrics key (the same namespaced keys: ``train/loss``, ``eval/<task>/success`` ...) at its step,
  and the run's figures (``curves.png`` ...) as images when it finishes.
- ``logger=wandb``: the same rows and figures to Weights & Biases, when the ``wandb`` package is
  installed (never required; ``logger.wandb.mode=offline`` writes locally).
- ``logger=[tensorboard,wandb]``: both.

A sink is a mirror of the log, not a second record: when a run resumes, ``metrics.jsonl`` is cut
back to the checkpoint's step (``MetricsLog``) and each sink starts again from the rows kept
(TensorBoard: the earlier event files are replaced by one replaying those rows), so what a sink
shows is what ``metrics.jsonl`` holds, never an interrupted attempt's extra steps twice.
"""

from __future__ import annotations

import math
import numbers
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from maskmtl.config import ConfigError
from maskmtl.outputs import METRICS, MetricsLog, read_metrics

TENSORBOARD_DIR = "tensorboard"
SINKS = ("tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics row (a sink plots numbers; lists, strings and NaNs
    stay in ``metrics.jsonl`` only)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class TensorBoardSink:
    """Event files under ``directory`` (torch's ``SummaryWriter``, which needs the ``tensorboard``
    package)."""

    def __init__(self, directory: Path, *, images: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError naming tensorboard when it is absent
            raise ConfigError(f"logger=tensorboard needs the tensorboard package ({e}); install it with "
                              f"`pip install tensorboard` (or the project's [logging] extra), or run with "
                              f"logger=jsonl") from None
        self.directory = Path(directory)
        self.images = bool(images)
        self._writer_cls = SummaryWriter
        self._writer = None

    def _events(self) -> list[Path]:
        return sorted(self.directory.glob("events.out.tfevents.*")) if self.directory.exists() else []

    def _open(self):
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.directory))
        return self._writer

    def restart(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Begin again from ``rows`` (the log as kept): a new event file replaying them, then the
        earlier files removed (a kill in between leaves rows twice, never lost ones)."""
        earlier = self._events()
        writer = self._open()
        for row in rows:
            step = int(row["step"])
            for key, value in scalars({k: v for k, v in row.items() if k not in ("step", "time")}).items():
                writer.add_scalar(key, value, step)
        writer.flush()
        for path in earlier:
            path.unlink(missing_ok=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        writer = self._open()
        for key, value in scalars(metrics).items():
            writer.add_scalar(key, value, int(step))

    def figures(self, paths: Mapping[str, Path], step: int) -> None:
        if not self.images:
            return
        import matplotlib.image

        for name, path in paths.items():
            image = matplotlib.image.imread(str(path))  # H x W x (3|4) floats in [0, 1]
            self._open().add_image(f"figures/{name}", image[..., :3], int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink:
    """A W&B run in ``directory`` (``wandb`` package, optional). The run id is kept in the run
    folder, so a resumed run continues the same W&B run (rows from the checkpoint's step on are
    sent again; W&B keeps the last value logged for a step)."""

    def __init__(self, directory: Path, *, project: str, mode: str, name: str | None, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package (`pip install wandb`); or run with "
                              "logger=jsonl / logger=tensorboard") from None
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.wandb.mode={mode!r}: expected one of {list(WANDB_MODES)}")
        self._wandb = wandb
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        id_file = self.directory / "wandb_run_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B's ids: letters and digits
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                               dir=str(self.directory), config=dict(config))

    def restart(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """W&B cannot take rows back; the rows after the checkpoint are simply logged again."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(scalars(metrics), step=int(step))

    def figures(self, paths: Mapping[str, Path], step: int) -> None:
        self._run.log({f"figures/{name}": self._wandb.Image(str(path)) for name, path in paths.items()},
                      step=int(step))

    def flush(self) -> None:
        """W&B sends in the background."""

    def close(self) -> None:
        self._run.finish()


def logger_sinks(logger_cfg: Mapping[str, Any] | None) -> list[str]:
    """The sinks a ``logger`` node asks for (validated): its keys among ``SINKS``."""
    if logger_cfg is None:
        return []
    if not isinstance(logger_cfg, Mapping):
        raise ConfigError(f"logger={logger_cfg!r}: expected a logger option (jsonl, tensorboard, wandb or a "
                          f"list of them, e.g. logger=[tensorboard,wandb])")
    unknown = [k for k in logger_cfg if k not in SINKS]
    if unknown:
        raise ConfigError(f"logger.{unknown[0]}: unknown logger sink; expected one of {list(SINKS)} "
                          f"(metrics.jsonl is always written)")
    return [k for k in SINKS if k in logger_cfg]


def check_logger(logger_cfg: Mapping[str, Any] | None) -> None:
    """Fail before training when a chosen sink's package is missing (not at the first log row)."""
    for sink in logger_sinks(logger_cfg):
        if sink == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("logger=tensorboard needs the tensorboard package: `pip install tensorboard` "
                                  "(or the project's [logging] extra), or run with logger=jsonl") from None
        elif sink == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("logger=wandb needs the wandb package: `pip install wandb`, or run with "
                                  "logger=jsonl / logger=tensorboard") from None
            mode = dict(logger_cfg["wandb"] or {}).get("mode", "online")
            if mode not in WANDB_MODES:
                raise ConfigError(f"logger.wandb.mode={mode!r}: expected one of {list(WANDB_MODES)}")


def open_sinks(out: Path, logger_cfg: Mapping[str, Any] | None, config: Mapping[str, Any] | None = None) -> list:
    """The sink objects of ``logger_cfg`` for the run folder ``out``."""
    sinks: list = []
    for name in logger_sinks(logger_cfg):
        opts = dict(logger_cfg[name] or {})
        if name == "tensorboard":
            sinks.append(TensorBoardSink(out / TENSORBOARD_DIR, images=opts.get("images", True)))
        else:
            sinks.append(WandbSink(out, project=opts.get("project", "maskmtl"), mode=opts.get("mode", "online"),
                                   name=opts.get("name"), config=config or {}))
    return sinks


class RunLog:
    """``metrics.jsonl`` and the sinks, written together. The sinks are opened once per run
    (``open_sinks``) and outlive a ``RunLog``: ``close`` closes the file and flushes the sinks.

    ``resume_step`` as in ``MetricsLog``: an integer (the training loop's start) cuts the log back
    and restarts every sink from the rows kept; ``None`` appends (rows after training)."""

    def __init__(self, out: Path, sinks: list, resume_step: int | None = None):
        self.jsonl = MetricsLog(Path(out) / METRICS, resume_step=resume_step)
        self.sinks = sinks
        if resume_step is not None and sinks:
            rows = read_metrics(Path(out) / METRICS)
            for sink in sinks:
                sink.restart(rows)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.jsonl.log(step, metrics)
        for sink in self.sinks:
            sink.log(step, metrics)

    def figures(self, paths: Iterable[Path], step: int) -> None:
        """The run's figures (PNG files that exist) to every sink that takes images."""
        found = {Path(p).stem: Path(p) for p in paths if Path(p).exists()}
        if found:
            for sink in self.sinks:
                sink.figures(found, step)

    def close(self) -> None:
        self.jsonl.close()
        for sink in self.sinks:
            sink.flush()
