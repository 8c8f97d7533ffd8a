"""Scorers (spec §2): the harmony score H that ranks active entries for dropping, and the
recovery score that ranks inactive entries for recovery.

    A = ḡ ⊙ ĝ                       agreement (per group: (Σ_{i∈G} ḡ_i) ⊙ ĝ)
    H = A + λ·I                     paper (``weighting="paper"``, the default)
    H = λ·A + I                     published code (``weighting="published"``)
    recovery = g ⊙ ĝ                 (per group: (Σ_{i∈G} g_i) ⊙ ĝ)

Importance I per scorer: ``AgreementScorer`` none (H = A), ``MagnitudeScorer`` |θ ⊙ M|,
``FisherScorer`` (∇log L ⊙ M)² = (ḡ / L)² (the published code squares ḡ without the log:
``log_loss=False``; ``conf/scorer/fisher_published.yaml`` sets both published choices).
Lower H = more conflicting and less important = dropped first.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .gradients import GroupGradients

WEIGHTINGS = ("paper", "published")


class AgreementScorer:
    """H = A: agreement with the mean masked gradient only.

    Args:
        lam: weight λ of the importance term (unused here: there is none; kept so that every
            scorer takes the same arguments and a sweep over scorers needs no per-option keys).
        weighting: ``"paper"`` (H = A + λI) or ``"published"`` (H = λA + I).
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
