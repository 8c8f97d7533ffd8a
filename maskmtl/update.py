"""The mask update (spec §3, Algorithms 2 and 5): which entries (scorer), how many (scheduler),
and the swap, which is the only code that changes masks and checks its own invariants.

Per group j, with both selections taken from the masks before the update:

    drop_j    = ArgBtmK_α( H_j  restricted to active entries )
    recover_j = ArgTopK_α( R_j  restricted to inactive entries )
    M_j      ← M_j − drop_j + recover_j

so exactly α entries leave and α enter, the two sets are disjoint, an entry dropped now cannot be
recovered in the same update, and every group's density is unchanged. Ranking is global over all
targets of the group (one flat vector), as ArgBtmK over θ in the papers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .gradients import RECOVERY_GRADIENTS, Batches, LossFn, estimate_gradients, harmony, unused_by_group
from .interfaces import Scheduler, Scorer, StepAwareScorer
from .masks import MaskSet
from .structures import StructureMap

RECOVERED_STATE = ("reset_dormant", "keep")


class MaskUpdateError(RuntimeError):
    """A swap that cannot be done (α too large, NaN scores) or that broke an invariant."""


@dataclass
class SwapResult:
    masks: dict[str, torch.Tensor]  # new masks [G, *P]
    dropped: dict[str, torch.Tensor]  # [G, *P] bool, entries turned off
    recovered: dict[str, torch.Tensor]  # [G, *P] bool, entries turned on
    alpha: int


def _flat(d: Mapping[str, torch.Tensor], names: list[str], g: int) -> torch.Tensor:
    return torch.cat([d[n][g].reshape(-1) for n in names])


def _rankable(s: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype that ranks them exactly as given: float32 and float64 stay as they are
    (float64 is not rounded to float32, which could tie or reorder close scores), half precision
    is widened to float32 and integers to float64."""
    if s.dtype in (torch.float32, torch.float64):
        return s
    return s.float() if s.is_floating_point() else s.double()


def _select(scores: torch.Tensor, candidates: torch.Tensor, k: int, largest: bool,
            first: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` best candidates by score (``largest``: highest). With ``first``, the
    candidates in ``first`` are all taken before any other, each part ranked by score."""
    fill = float("-inf") if largest else float("inf")
    if first is not None:
        first = first & candidates
        n_first = int(first.sum())
        if 0 < n_first < k:
            rest = candidates & ~first
            return torch.cat([first.nonzero().reshape(-1),
                              torch.topk(scores.masked_fill(~rest, fill), k - n_first, largest=largest).indices])
        if n_first >= k:
            candidates = first
    return torch.topk(scores.masked_fill(~candidates, fill), k, largest=largest).indices


def swap(masks: Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
         grow_scores: Mapping[str, torch.Tensor], alpha: int,
         unused: Mapping[str, torch.Tensor] | None = None) -> SwapResult:
    """Drop the ``alpha`` lowest-drop-score active entries and recover the ``alpha`` highest-grow-
    score inactive entries, in every group. Inputs and outputs are name -> ``[G, *P]`` tensors.

    Scores are ranked in their own dtype (float64 scores are not rounded to float32).

    ``unused`` (name -> ``[G, *P]`` bool, optional): entries that none of the group's tasks use
    (their gradients are zero, see ``maskmtl.gradients``). Active unused entries are dropped
    before any used one, and inactive unused entries are recovered only when there are fewer
    than ``alpha`` inactive used ones; within each part the scores rank as usual.

    Raises:
        MaskUpdateError: ``alpha`` exceeds a group's active or inactive entries, a candidate score
            is NaN, or an invariant fails (exact counts, disjointness, density).
    """
    names = list(masks)
    alpha = int(alpha)
    if alpha < 0:
        raise MaskUpdateError(f"alpha must be >= 0, got {alpha}")
    n_groups = next(iter(masks.values())).shape[0]
    sizes = [masks[n][0].numel() for n in names]
    new = {n: masks[n].clone() for n in names}
    dropped = {n: torch.zeros_like(masks[n]) for n in names}
    recovered = {n: torch.zeros_like(masks[n]) for n in names}
    if alpha == 0:
        return SwapResult(new, dropped, recovered, 0)
    for g in range(n_groups):
        active = _flat(masks, names, g)
        n_active = int(active.sum())
        n_inactive = active.numel() - n_active
        if alpha > n_active or alpha > n_inactive:
            raise MaskUpdateError(
                f"group {g}: alpha={alpha} exceeds its active ({n_active}) or inactive ({n_inactive}) "
                f"entries; lower the scheduler's eta_max/alpha or change the initializer's density")
        ds = _rankable(_flat(drop_scores, names, g))
        gs = _rankable(_flat(grow_scores, names, g))
        if torch.isnan(ds[active]).any() or torch.isnan(gs[~active]).any():
            raise MaskUpdateError(f"group {g}: NaN in the scores of candidate entries")
        idle = None if unused is None else _flat(unused, names, g).to(active.device)
        if idle is not None and not bool(idle.any()):
            idle = None
        drop_idx = _select(ds, active, alpha, largest=False, first=idle)
        grow_idx = _select(gs, ~active, alpha, largest=True, first=None if idle is None else ~idle)
        # Invariants: exact counts each way, drop ⊆ active, recover ⊆ inactive (hence disjoint).
        if drop_idx.unique().numel() != alpha or grow_idx.unique().numel() != alpha:
            raise MaskUpdateError(f"group {g}: selected entries are not unique")
        if not bool(active[drop_idx].all()) or bool(active[grow_idx].any()):
            raise MaskUpdateError(f"group {g}: a dropped entry was inactive or a recovered entry was active "
                                  f"(scores are +inf/-inf on candidates?)")
        flat = active.clone()
        flat[drop_idx] = False
        flat[grow_idx] = True
        if int(flat.sum()) != n_active or int((flat != active).sum()) != 2 * alpha:
            raise MaskUpdateError(f"group {g}: swap changed the density")
        d_flat = torch.zeros_like(active)
        d_flat[drop_idx] = True
        r_flat = torch.zeros_like(active)
        r_flat[grow_idx] = True
        for n, part, dpart, rpart in zip(names, flat.split(sizes), d_flat.split(sizes), r_flat.split(sizes)):
            shape = masks[n].shape[1:]
            new[n][g] = part.reshape(shape)
            dropped[n][g] = dpart.reshape(shape)
            recovered[n][g] = rpart.reshape(shape)
    return SwapResult(new, dropped, recovered, alpha)


def masks_from_scores(scores: Mapping[str, torch.Tensor], density: float,
                      unused: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per group, keep the ``round(density·|θ|)`` highest-scoring entries over all targets
    (G-HarmoDT's M_G = 1 − ArgBtmK_{S·|θ|}(Σ GH)). ``scores``: name -> ``[G, *P]``, ranked in
    their own dtype. ``unused`` (name -> ``[G, *P]`` bool): entries none of the group's tasks
    use, kept only when the used ones do not fill the budget."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = list(scores)
    sizes = [scores[n][0].numel() for n in names]
    n_groups = next(iter(scores.values())).shape[0]
    total = sum(sizes)
    keep = int(round(density * total))
    out = {n: torch.zeros(scores[n].shape, dtype=torch.bool, device=scores[n].device) for n in names}
    for g in range(n_groups):
        s = _rankable(_flat(scores, names, g))
        if torch.isnan(s).any():
            raise MaskUpdateError(f"group {g}: NaN in the scores")
        flat = torch.zeros(total, dtype=torch.bool, device=s.device)
        idle = None if unused is None else _flat(unused, names, g).to(s.device)
        if idle is None or not bool(idle.any()):
            flat[torch.topk(s, keep, largest=True).indices] = True
        else:
            flat[_select(s, torch.ones_like(flat), keep, largest=True, first=~idle)] = True
        for n, part in zip(names, flat.split(sizes)):
            out[n][g] = part.reshape(scores[n].shape[1:])
    return out


def check_schedule(scheduler: Scheduler, masks: MaskSet, key: str = "scheduler",
                   structures: StructureMap | None = None) -> None:
    """Fail before training if the schedule would ever ask for more swaps than a group can make.
    With a structure map, α and the counts are in structures (``StructureMap.alpha``)."""
    need = scheduler.max_alpha()
    if need == 0:
        return
    if structures is None:
        counts, total, unit = masks.counts(), masks.numel(), "entries"
    else:
        need = structures.alpha(need)
        counts, total, unit = structures.counts(masks.as_dict()), structures.n_structures, "structures"
    for g, c in enumerate(counts.tolist()):
        if need > c or need > total - c:
            raise MaskUpdateError(
                f"{key}: alpha reaches {need} but group {g} has {c} active and {total - c} inactive "
                f"{unit}; every update must drop and recover alpha {unit}. Lower {key}.eta_max (or "
                f"{key}.alpha), or use a density < 1 (a dense initializer leaves nothing to recover: "
                f"use scheduler=frozen)")


def unused_entries(per_group: Mapping[str, torch.Tensor] | None,
                   masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Per-group unused flags (name -> ``[G]``, ``GroupGradients.group_unused``) -> name -> ``[G, *P]``
    bool, the shape of ``masks``; ``None`` stays ``None``."""
    if per_group is None:
        return None
    out = {}
    for n, m in masks.items():
        u = per_group[n].to(m.device).reshape(-1, *([1] * (m.dim() - 1)))
        out[n] = u.expand(m.shape)
    return out


@dataclass
class MaskUpdater:
    """Runs one mask update: estimate gradients, score, swap, fix optimizer state.

    Args:
        scorer: a ``Scorer``. Entries of a target that no task of a group uses (a per-task head
            of another task, an output the loss never reads) are not ranked by their scores: the
            group drops its active entries there first and recovers inactive ones there last
            (see ``swap``), since they cost density and do nothing for the group's tasks.
        scheduler: a ``Scheduler`` (α_t).
        every: t_m, steps between updates (0: never).
        recovery_gradient: ``"dense"`` (Algorithm 2) or ``"masked_point"`` (cheaper).
        recovered_state: ``"reset_dormant"`` zeroes optimizer moments of recovered entries that
            no group used before the update; ``"keep"`` leaves them.
        structures: a ``StructureMap`` makes the swap structured (scores aggregated per
            structure, α_t converted to structures); ``None`` swaps entries.
    """

    scorer: Scorer
    scheduler: Scheduler
    every: int
    recovery_gradient: str = "dense"
    recovered_state: str = "reset_dormant"
    structures: StructureMap | None = None

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"masking.update_every must be >= 0, got {self.every}")
        if self.recovery_gradient not in RECOVERY_GRADIENTS:
            raise ValueError(f"masking.recovery_gradient must be one of {RECOVERY_GRADIENTS}, got {self.recovery_gradient!r}")
        if self.recovered_state not in RECOVERED_STATE:
            raise ValueError(f"masking.recovered_state must be one of {RECOVERED_STATE}, got {self.recovered_state!r}")

    def due(self, step: int) -> bool:
        """Whether an update runs after optimizer step ``step`` (1-based): every t_m steps."""
        return self.every > 0 and step > 0 and step % self.every == 0 and self.scheduler.alpha(step) > 0

    def update(self, step: int, model: nn.Module, masks: MaskSet, loss_fn: LossFn, batches: Batches,
               optimizer: Any = None, progress=None) -> dict[str, float]:
        """Update ``masks`` in place; returns ``mask/…`` metrics."""
        t0 = time.perf_counter()
        alpha = self.scheduler.alpha(step)
        grads = estimate_gradients(model, masks, loss_fn, batches, recovery=self.recovery_gradient, progress=progress)
        t_grad = time.perf_counter() - t0
        params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
        before = masks.as_dict()
        if isinstance(self.scorer, StepAwareScorer):
            self.scorer.begin_update(step)
        drop, grow = self.scorer.drop_scores(grads, params, before), self.scorer.grow_scores(grads)
        unused = unused_entries(grads.group_unused(), before)
        if self.structures is None:
            result = swap(before, drop, grow, alpha, unused=unused)
        else:
            result = self.structures.swap(before, drop, grow, self.structures.alpha(alpha), unused=unused)
        h = harmony(grads, before)
        revived = {n: result.masks[n].any(dim=0) & ~before[n].any(dim=0) for n in masks.names}
        masks.set_masks(result.masks)
        n_reset = 0
        if optimizer is not None and self.recovered_state == "reset_dormant":
            n_reset = optimizer.reset_entries(revived)
        dens = masks.density()
        return {
            "mask/alpha": float(alpha),
            "mask/harmony": h,
            "mask/density_mean": float(dens.mean()),
            "mask/swapped": float(2 * result.alpha * masks.n_groups),  # entries, or structures if structured
            "mask/revived": float(sum(int(r.sum()) for r in revived.values())),
            "mask/optimizer_entries_reset": float(n_reset),
            "time/mask_update_s": time.perf_counter() - t0,
            "time/mask_gradients_s": t_grad,
        }


def group_tasks(model: nn.Module, masks: MaskSet, scorer: Scorer, grouper: Any, loss_fn: LossFn,
                batches: Batches, density: float, seed: int, recovery_gradient: str = "dense",
                structures: StructureMap | None = None) -> dict[str, Any]:
    """G-HarmoDT stage 2 (Algorithm 4): group tasks and initialise one mask per group, in place.

    Each task's harmony vector GH(T_i, 1) is scored with all-ones masks and one group per task;
    the grouper clusters those vectors; each group's mask keeps the ``round(density·|θ|)`` entries
    with the highest summed harmony Σ_{i∈G_j} GH(T_i, 1) over all targets.

    With a structure map, the task vectors are the aggregated structure scores ``[N, S]`` and
    each group keeps ``round(density·S)`` structures.

    Returns ``{"task_to_group", "task_vectors" [N, D], "harmony"}``.
    """
    ones = MaskSet({n: torch.ones((masks.n_tasks, *m.shape[1:]), dtype=torch.bool, device=m.device)
                    for n, m in masks.items()}, masks.tasks)
    grads = estimate_gradients(model, ones, loss_fn, batches, recovery=recovery_gradient)
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    scores = scorer.drop_scores(grads, params, ones.as_dict())  # [N, *P] per target
    if structures is None:
        vectors = torch.cat([scores[n].reshape(masks.n_tasks, -1) for n in masks.names], dim=1)
    else:
        vectors = structures.aggregate(scores).float()
    t2g = grouper.group(vectors, seed)
    n_groups = max(t2g) + 1
    idx = torch.tensor(t2g)
    summed = {n: torch.zeros((n_groups, *s.shape[1:]), dtype=s.dtype, device=s.device).index_add_(0, idx.to(s.device), s)
              for n, s in scores.items()}
    pick = masks_from_scores if structures is None else structures.masks_from_scores
    unused = unused_entries(unused_by_group(grads.task_unused, t2g), summed)
    masks.set_grouping(t2g, pick(summed, density, unused=unused))
    return {"task_to_group": t2g, "task_vectors": vectors, "harmony": harmony(grads, ones.as_dict())}
