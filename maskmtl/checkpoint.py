"""Training checkpoints: model, masks, optimizer, step, and every RNG state, in one file written
atomically and read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

Resuming from a checkpoint continues the exact same random streams, so a killed and resumed run
ends where an uninterrupted one does (same device, same seed).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .masks import MaskError, atomic_write_bytes


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Global RNG states (python, numpy, torch, CUDA) plus named explicit generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


def save_checkpoint(path: str | os.PathLike, *, step: int, model: torch.nn.Module, masks: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator] | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write one checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    payload = {
        "step": int(step),
        "model": model.state_dict(),
        "masks": masks.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(generators),
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, masks: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns ``{"step": …, "extra": …}``."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); move it away to start afresh") from e
    need = ("step", "model", "masks", "optimizer", "rng", "extra")
    missing = [k for k in need if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise RuntimeError(f"checkpoint {path} is not a maskmtl checkpoint: it lacks {missing} "
                           f"(save_checkpoint writes {list(need)}); move it away to start afresh")
    for key, part in (("masks", masks), ("model", model), ("optimizer", optimizer)):
        try:
            part.load_state_dict(payload[key])
        except (RuntimeError, ValueError, KeyError) as e:
            kind = next(k for k in (MaskError, ValueError, KeyError, RuntimeError) if isinstance(e, k))
            raise kind(f"checkpoint {path}: its {key} state does not fit this run's {key}: {e}") from e
    set_rng_state(payload["rng"], generators)
    return {"step": payload["step"], "extra": payload["extra"]}
