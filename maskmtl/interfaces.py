"""The four extension points of maskmtl, on one screen.

Each is a ``typing.Protocol``: any object with these methods plugs in, and each implementation is
chosen from config by its own conf group (``conf/scorer``, ``conf/scheduler``, ``conf/initializer``,
``conf/grouper``). Vocabulary used throughout:

* ``task``  -- an entry of the fixed, ordered task list (index ``0..N-1``).
* ``group`` -- a row of the masks; every task maps to exactly one group (``task_to_group``).
  Plain HarmoDT has one group per task; G-HarmoDT has ``N^G < N`` groups.
* ``mask``  -- a ``torch.bool`` tensor of shape ``[groups, *param.shape]`` per target parameter.
* ``density`` -- fraction of ones in a mask (the papers' sparsity S is ``1 - density``).

Shapes below: ``G`` groups, ``P`` = a target parameter's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:  # imported for annotations only
    from .gradients import GroupGradients


@runtime_checkable
class Scorer(Protocol):
    """Ranks mask entries for the swap: which active entries to drop, which inactive to recover."""

    def drop_scores(
        self,
        grads: "GroupGradients",
        params: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Harmony score H per entry; the swap drops the lowest among active entries.

        Args:
            grads: per-group gradient estimates (masked, dense, loss) and their mean.
            params: target name -> current dense parameter θ, shape ``P``.
            masks: target name -> bool mask, shape ``[G, *P]`` (before the update).
        Returns:
            target name -> float scores, shape ``[G, *P]``. Values at inactive entries are ignored.
        """
        ...

    def grow_scores(self, grads: "GroupGradients") -> dict[str, torch.Tensor]:
        """Recovery score per entry; the swap recovers the highest among inactive entries.

        Returns:
            target name -> float scores, shape ``[G, *P]``. Values at active entries are ignored.
        """
        ...


# Optional scorer hooks. ``MaskUpdater`` uses each when the scorer has it; a scorer with only the
# two methods above works as before. Not part of ``Scorer`` itself, so ``isinstance(x, Scorer)``
# still holds for scorers written before these existed.
@runtime_checkable
class StepAwareScorer(Protocol):
    """A scorer whose scores depend on the step (``RandomScorer`` seeds its draws from it)."""

    def begin_update(self, step: int) -> None:
        """Called by ``MaskUpdater.update`` with the step, before ``drop_scores``/``grow_scores``."""
        ...


@runtime_checkable
class TermScorer(Protocol):
    """A scorer whose H is the sum of an agreement term and an importance term."""

    def drop_scores_and_terms(
        self,
        grads: "GroupGradients",
        params: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
        """``drop_scores``' result (exactly) and, computed with it, the two terms of H as they
        are added, (agreement term, importance term), each name -> ``[G, *P]``; the second is
        ``None`` when there is no importance term. With diagnostics on, ``MaskUpdater`` calls
        this instead of ``drop_scores`` and logs the share of active entries where the agreement
        term is the larger in magnitude (which term decides)."""
        ...


@runtime_checkable
class Scheduler(Protocol):
    """How many entries each group swaps at a given step: a pure function of ``step``."""

    def alpha(self, step: int) -> int:
        """Number of entries dropped (and as many recovered) per group at ``step``; ``>= 0``."""
        ...

    def max_alpha(self) -> int:
        """Largest value ``alpha`` takes over the whole run (used to validate before training)."""
        ...


@runtime_checkable
class Initializer(Protocol):
    """Initial masks: per-target densities, then exact counts drawn from a seeded generator."""

    def densities(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
        """Target name -> density in ``(0, 1]`` for a layer of that shape."""
        ...

    def init_masks(
        self,
        shapes: Mapping[str, Sequence[int]],
        n_groups: int,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Target name -> bool mask ``[n_groups, *shape]``; each group row drawn independently with
        exactly ``round(density * numel)`` ones."""
        ...


@runtime_checkable
class Grouper(Protocol):
    """Clusters tasks into mask groups from per-task score vectors (G-HarmoDT, Algorithm 4)."""

    def group(self, task_vectors: torch.Tensor, seed: int) -> list[int]:
        """Args:
            task_vectors: ``[N, D]`` one score vector per task (e.g. its flattened harmony score).
            seed: makes the result deterministic.
        Returns:
            ``task_to_group``: list of N ints in ``0..G-1``, every group non-empty, groups numbered
            in order of first appearance over tasks.
        """
        ...

    def n_groups(self, n_tasks: int) -> int:
        """Number of groups this grouper produces for ``n_tasks`` tasks (known before training)."""
        ...
