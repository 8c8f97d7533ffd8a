"""Scorers (spec §2): the harmony score H that ranks active entries for dropping, and the
recovery score that ranks inactive entries for recovery.

    A = ḡ ⊙ ĝ                       agreement (per group: (Σ_{i∈G} ḡ_i) ⊙ ĝ)
    H = A + λ·I                     paper (``weighting="paper"``, the default)
    H = λ·A + I                     published code (``weighting="published"``)
    H = q(A) + λ·q(I)               maskmtl's variant (``weighting="rank"``), not in either paper:
                                    q = percentile rank within the group's active entries
    recovery = g ⊙ ĝ                 (per group: (Σ_{i∈G} g_i) ⊙ ĝ)

Importance I per scorer: ``AgreementScorer`` none (H = A), ``MagnitudeScorer`` |θ ⊙ M|,
``FisherScorer`` (∇log L ⊙ M)² = (ḡ / L)² (the published code squares ḡ without the log:
``log_loss=False``; ``conf/scorer/fisher_published.yaml`` sets both published choices).
Lower H = more conflicting and less important = dropped first.

Why ``rank``: A and I have unrelated scales. With the paper's λ = 10, λ·I exceeds |A| on nearly
every active entry, so the magnitude (or Fisher) ranking alone decides every drop and agreement
plays no part; the published weighting tips it the other way. ``weighting="rank"`` replaces each
term by its percentile rank q in [0, 1] among the group's active entries (all targets of the group
together, as the swap ranks them; ties share their mean rank; q = (rank − 1)/(n − 1) with ranks
1..n, and q = 0.5 when a group has a single active entry) before adding, so neither term decides
by its scale: λ is then a pure relative weight of the two rankings (λ = 1: equal weight; the
``*_rank`` scorer configs set it). Inactive entries score 0 (ignored by the swap). Ranking costs
one sort per term and group at each mask update.

``RandomScorer`` is a control, not a method: it drops and recovers uniformly random entries at the
same α_t, so "learned" masks can be compared with masks that change as much, not only with frozen
ones.
"""

from __future__ import annotations

import operator
from typing import Mapping

import numpy as np
import torch

from .gradients import GroupGradients

WEIGHTINGS = ("paper", "published", "rank")


def percentile_ranks(values: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per group, the percentile rank q in [0, 1] of every active entry among the group's active
    entries over all targets (``values`` and ``masks``: name -> ``[G, *P]``). Ties share their mean
    rank; q = (rank − 1)/(n − 1) with ranks 1..n (q = 0.5 for a single active entry). Inactive
    entries get 0; NaN values stay NaN (the swap refuses them). float64."""
    names = list(values)
    out = {n: torch.zeros(values[n].shape, dtype=torch.float64, device=values[n].device) for n in names}
    n_groups = values[names[0]].shape[0]
    for g in range(n_groups):
        act = [masks[n][g].to(values[n].device) for n in names]
        x = torch.cat([values[n][g][a].double() for n, a in zip(names, act)])
        q = torch.full_like(x, float("nan"))
        ok = ~torch.isnan(x)
        v = x[ok]
        if v.numel() == 1:
            q[ok] = 0.5
        elif v.numel() > 1:
            sorted_v, order = torch.sort(v)
            _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
            ends = counts.cumsum(0)  # 1-based last position of each distinct value
            mean_rank = (ends - counts + 1 + ends).double() / 2  # 1-based mean rank of each run of ties
            ranks = torch.empty_like(v)
            ranks[order] = mean_rank[inverse]
            q[ok] = (ranks - 1) / (v.numel() - 1)
        for n, a, part in zip(names, act, q.split([int(a.sum()) for a in act])):
            out[n][g][a] = part
    return out


class AgreementScorer:
    """H = A: agreement with the mean masked gradient only.

    Args:
        lam: weight λ of the importance term (unused here: there is none; kept so that every
            scorer takes the same arguments and a sweep over scorers needs no per-option keys).
        weighting: ``"paper"`` (H = A + λI), ``"published"`` (H = λA + I) or ``"rank"``
            (H = q(A) + λ·q(I), percentile ranks within the group's active entries: maskmtl's
            scale-free variant, see the module docstring).
    """

    def __init__(self, lam: float = 10.0, weighting: str = "paper"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"scorer.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if lam < 0:
            raise ValueError(f"scorer.lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.weighting = weighting

    def importance(self, grads: GroupGradients, params: Mapping[str, torch.Tensor],
                   masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Target name -> I, shape ``[G, *P]``; ``None`` for no importance term."""
        return None

    def drop_scores(self, grads, params, masks):
        if self.weighting == "rank":
            return self.drop_scores_and_terms(grads, params, masks)[0]
        imp = self.importance(grads, params, masks)
        out = {}
        for n, gsum in grads.masked.items():
            a = gsum * grads.mean[n]  # [G,*P] ⊙ [P]
            if imp is None:
                out[n] = a
            elif self.weighting == "paper":
                out[n] = a.add_(imp[n], alpha=self.lam)
            else:
                out[n] = a.mul_(self.lam).add_(imp[n])
        return out

    def drop_terms(self, grads, params, masks) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The two terms of H as they are added: (agreement term, importance term), name ->
        ``[G, *P]``; the importance term is ``None`` without importance. ``paper``: (A, λ·I);
        ``published``: (λ·A, I); ``rank``: (q(A), λ·q(I))."""
        return self.drop_scores_and_terms(grads, params, masks)[1]

    def drop_scores_and_terms(self, grads, params, masks):
        """``(drop_scores(...), drop_terms(...))`` computed once (the scores equal
        ``drop_scores``' exactly); the mask update uses it for its diagnostics."""
        imp = self.importance(grads, params, masks)
        a = {n: gsum * grads.mean[n] for n, gsum in grads.masked.items()}
        if self.weighting == "rank":
            qa = percentile_ranks(a, masks)
            if imp is None:
                return qa, (qa, None)
            qi = {n: q.mul_(self.lam) for n, q in percentile_ranks(imp, masks).items()}
            return {n: qa[n] + qi[n] for n in qa}, (qa, qi)
        if imp is None:
            return a, (a, None)
        if self.weighting == "paper":  # the same kernel as drop_scores' in-place add
            return ({n: torch.add(a[n], imp[n], alpha=self.lam) for n in a},
                    (a, {n: imp[n] * self.lam for n in a}))
        la = {n: t.mul_(self.lam) for n, t in a.items()}
        return {n: la[n] + imp[n] for n in la}, (la, imp)

    def grow_scores(self, grads):
        return {n: d * grads.mean[n] for n, d in grads.dense.items()}


class MagnitudeScorer(AgreementScorer):
    """HarmoDT-M: I = |θ ⊙ M| (per group, the group's mask)."""

    def importance(self, grads, params, masks):
        return {n: params[n].abs() * masks[n] for n in grads.masked}


class FisherScorer(AgreementScorer):
    """HarmoDT-F: I = (∇ log L ⊙ M)² = (ḡ / L)², with L the group's summed mean loss.

    Args:
        log_loss: ``True`` (paper) divides by the loss; ``False`` squares ḡ (published code).
    """

    def __init__(self, lam: float = 10.0, weighting: str = "paper", log_loss: bool = True):
        super().__init__(lam, weighting)
        self.log_loss = bool(log_loss)

    def importance(self, grads, params, masks):
        if not self.log_loss:
            return {n: g.square() for n, g in grads.masked.items()}
        if (grads.loss <= 0).any() or not torch.isfinite(grads.loss).all():
            raise ValueError(f"the Fisher scorer takes ∇log L = ∇L / L and needs a positive finite "
                             f"loss; group losses are {grads.loss.tolist()} (use log_loss=false or another scorer)")
        out = {}
        for n, g in grads.masked.items():
            inv = (1.0 / grads.loss).to(g.dtype).to(g.device).reshape(-1, *([1] * (g.dim() - 1)))
            out[n] = (g * inv).square_()
        return out


def _check_seed(seed) -> int:
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"scorer.seed must be an integer >= 0, got {seed!r}") from None
    if value < 0:
        raise ValueError(f"scorer.seed must be an integer >= 0, got {value}")
    return value


class RandomScorer:
    """Control: drop and recover uniformly random entries, at the same α_t as any scorer.

    Each group's drop scores and recovery scores are a fresh random permutation of ``1..|θ|`` over
    the group's entries (all targets, in target order), drawn from a CPU generator seeded from
    ``(seed, step, group, kind)`` only (``kind``: drop or recovery). The swap keeps the α_t lowest
    among active entries and the α_t highest among inactive ones, so the dropped set is a uniform
    random α_t-subset of the active entries and the recovered set one of the inactive entries,
    chosen independently; every swap invariant is the swap's own (``maskmtl.selection.swap``). No
    state is kept between updates: a killed and resumed run draws the same entries as an
    uninterrupted one, with nothing to checkpoint. The mask update tells the scorer its step
    (``begin_update``); called outside a mask update (G-HarmoDT's grouping, a direct call) it
    uses the last step it was given, 0 at first.

    As for every scorer, entries of a target no task of the group uses are dropped first and
    recovered last (``MaskUpdater``); with structured masks the swap ranks structures by the mean
    of their entries' random scores (equal-sized structures are then equally likely).

    Args:
        seed: the run's seed (``conf/scorer/random.yaml`` takes ``${seed}``).
        lam, weighting: checked and unused (no score to weight), so sweeps over scorers can set
            them for every option.
    """

    DROP, GROW = 0, 1

    def __init__(self, seed: int = 0, lam: float = 10.0, weighting: str = "paper"):
        AgreementScorer(lam, weighting)  # the same checks and messages
        self.seed = _check_seed(seed)
        self.lam = float(lam)
        self.weighting = weighting
        self.step = 0

    def begin_update(self, step: int) -> None:
        """Called by ``MaskUpdater.update`` before it asks for scores: the step seeds the draw."""
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step = step

    def generator(self, group: int, kind: int) -> torch.Generator:
        """The CPU generator of one group's drop (``kind=0``) or recovery (``kind=1``) scores at
        the current step."""
        state = np.random.SeedSequence([self.seed, self.step, int(group), int(kind)]).generate_state(2, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))

    def _scores(self, like: Mapping[str, torch.Tensor], kind: int,
                groups: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Row r of the scores is group ``groups[r]``'s draw (default: row r is group r; a one-group
        slice of the group-at-a-time update draws what the full update draws for that group)."""
        names = list(like)
        if groups is None:
            groups = list(range(like[names[0]].shape[0]))
        sizes = [like[n][0].numel() for n in names]
        out = {n: torch.empty(like[n].shape, dtype=torch.float64, device=like[n].device) for n in names}
        for row, g in enumerate(groups):
            perm = torch.randperm(sum(sizes), generator=self.generator(g, kind)).add_(1).double()
            for n, part in zip(names, perm.split(sizes)):
                out[n][row] = part.reshape(like[n].shape[1:]).to(like[n].device)
        return out

    def drop_scores(self, grads, params, masks):
        return self._scores(masks, self.DROP, _row_groups(grads))

    def grow_scores(self, grads):
        return self._scores(grads.dense, self.GROW, _row_groups(grads))


def _row_groups(grads) -> list[int] | None:
    """The groups ``grads``' rows are (``GroupGradients.groups``); None (row r = group r) for gradient
    records without that method."""
    groups = getattr(grads, "groups", None)
    return groups() if callable(groups) else None
