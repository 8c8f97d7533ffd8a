"""Schedules of α_t, the number of entries each group swaps at step t (spec §4). Pure functions of
the step: no counters, nothing to checkpoint.

The budget is given in one of two units (``scheduler.unit``):

* ``count`` (the default): ``eta_min`` / ``eta_max`` / ``alpha`` are entries per group.
* ``share``: they are fractions in [0, 1) of each group's *active* entries (of its active
  structures under a structured ``masking.granularity``). The counts are known only once the
  masks are: ``maskmtl.update.check_schedule`` converts the shares (``set_active``) before any
  update reads α, and ``alpha()`` refuses to answer until then. A share s becomes
  ⌈s · active⌉ (rounded to 9 decimals first, as the cosine's ceiling), so any s > 0 swaps at
  least one; with groups of different sizes the smallest group's count is used, so no group
  changes more than its share. A swap keeps every group's active count, so the conversion made
  from the initial masks holds for the whole run (and a resumed run makes the same one).
"""

from __future__ import annotations

import math
from typing import Callable

UNITS = ("count", "share")


def share_to_count(share: float, active: int) -> int:
    """⌈share · active⌉, the product rounded to 9 decimals first (0.01 · 1000 is 10, not 11)."""
    return max(0, math.ceil(round(float(share) * int(active), 9)))


class _Budget:
    """The unit and the conversion of shares to counts, shared by the schedulers."""

    unit: str
    _shares: dict[str, float]
    _counts: dict[str, int] | None

    def _init_budget(self, unit: str, values: dict[str, float]) -> None:
        if unit not in UNITS:
            raise ValueError(f"scheduler.unit={unit!r}: expected one of {list(UNITS)}")
        self.unit = unit
        for key, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"scheduler.{key}={v!r}: expected a number")
            if unit == "count" and (not float(v).is_integer() or v < 0):
                raise ValueError(f"scheduler.{key} must be a count >= 0, got {v!r}")
            if unit == "share" and not 0 <= v < 1:
                raise ValueError(f"scheduler.{key}={v!r}: with scheduler.unit=share expected a fraction in [0, 1) "
                                 f"of each group's active entries")
        self._shares = {k: float(v) for k, v in values.items()} if unit == "share" else {}
        self._counts = {k: int(v) for k, v in values.items()} if unit == "count" else None
        self.active: int | None = None

    def set_active(self, active: int, to_entries: Callable[[int], int] | None = None) -> None:
        """``unit=share``: convert the shares with ``active`` (the smallest group's active entries,
        or active structures with ``to_entries`` mapping a structure count to the entry count the
        structure map turns back into it). A no-op for ``unit=count``."""
        if self.unit != "share":
            return
        if int(active) < 0:
            raise ValueError(f"active must be >= 0, got {active}")
        self.active = int(active)
        counts = {k: share_to_count(s, active) for k, s in self._shares.items()}
        self._counts = {k: (to_entries(c) if to_entries is not None else c) for k, c in counts.items()}
        self._converted()

    def _converted(self) -> None:
        """Hook: the counts are (re)set."""

    def _count(self, key: str) -> int:
        if self._counts is None:
            raise RuntimeError(f"scheduler.unit=share: α is a share of each group's active entries, known once the "
                               f"masks are; call maskmtl.update.check_schedule(scheduler, masks) first "
                               f"(shares {self._shares})")
        return self._counts[key]

    @property
    def converted(self) -> bool:
        """Whether α is known in entries (always for ``unit=count``)."""
        return self._counts is not None

    def _moves(self) -> int:
        """Before a share is converted: 1 if any share is > 0 (it converts to at least one), else 0."""
        return int(any(s > 0 for s in self._shares.values()))


class CosineScheduler(_Budget):
    """α_t = ⌈η_max + ½(η_min − η_max)(1 + cos(2πt/E))⌉  (eq. 12).

    α_0 = η_min, α_{E/2} = η_max, α_E = η_min: warm-up, then anneal. This follows the paper's
    ceiling (the published code truncates with ``int``); the argument of the ceiling is rounded
    to 9 decimals first so that float noise (e.g. 3.0000000000004) does not add one.

    Args:
        eta_min, eta_max: bounds on entries swapped per group per update (counts, ``>= 0``; with
            ``unit=share`` fractions in [0, 1) of the group's active entries, converted to counts
            once the masks are known, see the module docstring).
        total_steps: E, the run's total optimizer steps (passed at build time).
        unit: ``count`` or ``share``.
    """

    def __init__(self, eta_min: float = 0, eta_max: float = 100, total_steps: int = 1, unit: str = "count"):
        self._init_budget(unit, {"eta_min": eta_min, "eta_max": eta_max})
        if total_steps < 1:
            raise ValueError(f"total steps must be >= 1 (train.steps), got {total_steps}")
        self.total_steps = int(total_steps)
        self._converted()

    def _converted(self) -> None:
        if self._counts is not None:
            self.eta_min, self.eta_max = self._counts["eta_min"], self._counts["eta_max"]

    def alpha(self, step: int) -> int:
        lo, hi = self._count("eta_min"), self._count("eta_max")
        x = hi + 0.5 * (lo - hi) * (1 + math.cos(2 * math.pi * step / self.total_steps))
        return max(0, math.ceil(round(x, 9)))

    def max_alpha(self) -> int:
        """The largest α_t; for an unconverted share, 1 if it swaps anything (a lower bound), else 0."""
        if self._counts is None:
            return self._moves()
        return max(self.eta_min, self.eta_max)


class ConstantScheduler(_Budget):
    """α_t = alpha at every step; ``alpha=0`` freezes the masks (HarmoDT-R, dense baselines).
    ``unit=share``: ``alpha`` is a fraction in [0, 1) of each group's active entries."""

    def __init__(self, alpha: float = 0, total_steps: int | None = None, unit: str = "count"):
        self._init_budget(unit, {"alpha": alpha})
        self._converted()

    def _converted(self) -> None:
        if self._counts is not None:
            self.value = self._counts["alpha"]

    def alpha(self, step: int) -> int:
        return self._count("alpha")

    def max_alpha(self) -> int:
        """α; for an unconverted share, 1 if it swaps anything (a lower bound), else 0."""
        return self._moves() if self._counts is None else self.value
