"""The output contract every run keeps, in its run directory:

* ``results.json``      -- recipe, chosen options, tasks, per-task metrics, headline metric, steps,
                            wall_time_s (written once, atomically, at the end);
* ``masks.safetensors`` -- the final masks (``maskmtl.masks.save_masks``);
* ``metrics.jsonl``     -- one JSON object per line ``{"step": s, "<namespace>/<key>": value, …}``,
                            readable with ``read_metrics(path)`` (or ``json.loads`` per line).
"""

from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path
from typing import Any, Mapping

from .masks import atomic_write_bytes

RESULTS = "results.json"
MASKS = "masks.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (NaN/inf become null)."""
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


class MetricsError(ValueError):
    """A ``metrics.jsonl`` line that is not a metrics row, named by file and line number."""


def _parse_lines(path: Path, text: str) -> list[tuple[str, dict]]:
    """``(line, row)`` for each non-empty line of a metrics log.

    A last line that is not JSON is dropped: a run killed (or read) while writing leaves a
    truncated last line, and that line was written after the run's last checkpoint, so a resumed
    run writes it again. Anything else that is not a ``{"step": <int >= 0>, …}`` object is a
    ``MetricsError`` naming the file and the line.
    """
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise MetricsError(f"{path}:{i + 1}: not a JSON line ({e.msg} at column {e.colno}); expected one "
                               f"JSON object per line, like {{\"step\": 10, \"train/loss\": 0.5}}") from e
        step = row.get("step") if isinstance(row, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise MetricsError(f"{path}:{i + 1}: expected a JSON object with an integer \"step\" >= 0, got "
                               f"{line[:80]!r}")
        rows.append((line, row))
    return rows


class MetricsLog:
    """Append-only JSONL metrics log.

    Args:
        path: the ``metrics.jsonl`` file.
        resume_step: where the run (re)starts. An int ``s`` keeps only the lines of steps ``<= s``
            already in the file and drops the rest: on resume ``s`` is the checkpoint's step (lines
            after it were written by the interrupted run and are written again), on a fresh start
            ``0`` (steps are 1-based: nothing of an earlier attempt killed before its first
            checkpoint is kept). ``None`` appends to whatever the file holds: for a second log the
            same run opens later (its final evaluation).
    Raises:
        MetricsError: on resume (``resume_step > 0``), a line before the last one is not a metrics
            row (see ``read_metrics``).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None:  # any integer type (a numpy one too), not a bool
            integer = hasattr(type(resume_step), "__index__") and not isinstance(resume_step, bool)
            if not integer or operator.index(resume_step) < 0:
                raise ValueError(f"resume_step={resume_step!r}: expected None (append) or an integer >= 0 "
                                 f"(the checkpoint's step, 0 for a fresh start)")
            resume_step = operator.index(resume_step)
        if resume_step == 0 and self.path.exists():
            # a fresh start: the lines of an earlier attempt (killed before its first checkpoint) all go,
            # whatever they hold
            if self.path.stat().st_size:
                atomic_write_bytes(self.path, b"")
        elif resume_step is not None and self.path.exists():
            text = _read_text(self.path)
            keep = "".join(line + "\n" for line, row in _parse_lines(self.path, text) if row["step"] <= resume_step)
            if keep != text:
                atomic_write_bytes(self.path, keep.encode())
        elif self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # The last line has no newline: a run killed mid-write. Appending after it would glue
                # the next row onto it: a complete JSON line gets its newline, a truncated one is cut
                # off (it is unreadable anyway, read_metrics drops it).
                cut = data.rfind(b"\n") + 1
                try:
                    json.loads(data[cut:])
                    complete = True
                except ValueError:
                    complete = False
                with open(self.path, "r+b") as f:
                    if complete:
                        f.seek(0, os.SEEK_END)
                        f.write(b"\n")
                    else:
                        f.truncate(cut)
        self._f = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(_jsonable({"step": int(step), **metrics})) + "\n")

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a truncated last line (a run still writing, or killed) is
    dropped. Raises ``MetricsError`` (file and line) for any other line that is not a metrics row."""
    path = Path(path)
    return [row for _, row in _parse_lines(path, _read_text(path))]


def _read_text(path: Path) -> str:
    # rows are written with json.dumps (ASCII); a byte that is not UTF-8 makes its line not JSON
    return path.read_bytes().decode("utf-8", errors="replace")
