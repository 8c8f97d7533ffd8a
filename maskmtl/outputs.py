"""The output contract every run keeps, in its run directory:

* ``results.json``      -- recipe, chosen options, tasks, per-task metrics, headline metric, steps,
                            wall_time_s (written once, atomically, at the end);
* ``masks.safetensors`` -- the final masks (``maskmtl.masks.save_masks``);
* ``metrics.jsonl``     -- one JSON object per line ``{"step": s, "<namespace>/<key>": value, …}``,
                            readable with ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import json
import math
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


class MetricsLog:
    """Append-only JSONL metrics log. On resume from step ``s``, lines after ``s`` (written after
    the checkpoint by the interrupted run) are dropped so the log matches an uninterrupted run."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())
        self._f = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(_jsonable({"step": int(step), **metrics})) + "\n")

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
