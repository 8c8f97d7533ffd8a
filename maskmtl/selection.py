"""The swap (spec §3, Algorithms 2 and 5): given the masks and scores, which entries leave and
which enter. Pure functions of tensors (no model, no optimizer, no structure map): the only code
that changes masks, and it checks its own invariants. ``maskmtl.update`` runs it inside a mask
update, ``maskmtl.structures`` runs it on structures.

Per group j, with both selections taken from the masks before the update:

    drop_j    = ArgBtmK_α( H_j  restricted to active entries )
    recover_j = ArgTopK_α( R_j  restricted to inactive entries )
    M_j      ← M_j − drop_j + recover_j

so exactly α entries leave and α enter, the two sets are disjoint, an entry dropped now cannot be
recovered in the same update, and every group's density is unchanged. Ranking is global over all
targets of the group (one flat vector), as ArgBtmK over θ in the papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


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
