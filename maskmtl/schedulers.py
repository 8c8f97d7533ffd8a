"""Schedules of α_t, the number of entries each group swaps at step t (spec §4). Pure functions of
the step: no counters, nothing to checkpoint."""

from __future__ import annotations

import math


class CosineScheduler:
    """α_t = ⌈η_max + ½(η_min − η_max)(1 + cos(2πt/E))⌉  (eq. 12).

    α_0 = η_min, α_{E/2} = η_max, α_E = η_min: warm-up, then anneal. This follows the paper's
    ceiling (the published code truncates with ``int``); the argument of the ceiling is rounded
    to 9 decimals first so that float noise (e.g. 3.0000000000004) does not add one.

    Args:
        eta_min, eta_max: bounds on entries swapped per group per update (counts, ``>= 0``).
        total_steps: E, the run's total optimizer steps (passed at build time).
    """

    def __init__(self, eta_min: int = 0, eta_max: int = 100, total_steps: int = 1):
        for key, v in (("eta_min", eta_min), ("eta_max", eta_max)):
            if not float(v).is_integer() or v < 0:
                raise ValueError(f"scheduler.{key} must be a count >= 0, got {v!r}")
        if total_steps < 1:
            raise ValueError(f"total steps must be >= 1 (train.steps), got {total_steps}")
        self.eta_min, self.eta_max, self.total_steps = int(eta_min), int(eta_max), int(total_steps)

    def alpha(self, step: int) -> int:
        x = self.eta_max + 0.5 * (self.eta_min - self.eta_max) * (1 + math.cos(2 * math.pi * step / self.total_steps))
        return max(0, math.ceil(round(x, 9)))

    def max_alpha(self) -> int:
        return max(self.eta_min, self.eta_max)


class ConstantScheduler:
    """α_t = alpha at every step; ``alpha=0`` freezes the masks (HarmoDT-R, dense baselines)."""

    def __init__(self, alpha: int = 0, total_steps: int | None = None):
        if not float(alpha).is_integer() or alpha < 0:
            raise ValueError(f"scheduler.alpha must be a count >= 0, got {alpha!r}")
        self.value = int(alpha)

    def alpha(self, step: int) -> int:
        return self.value

    def max_alpha(self) -> int:
        return self.value
