"""Initial masks (spec §5). ``densities`` says how dense each target is; ``init_masks`` draws each
group's row with exactly ``round(density · numel)`` ones from an explicit ``torch.Generator``."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"initializer.density must be in (0, 1] (density = 1 - sparsity S), got {density}")
    return density


def draw_masks(densities: Mapping[str, float], shapes: Mapping[str, Sequence[int]], n_groups: int,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each group row of each target: a uniformly random set of exactly round(d·numel) entries."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    out = {}
    for name, shape in shapes.items():
        numel = _numel(shape)
        k = int(round(densities[name] * numel))
        m = torch.zeros((n_groups, numel), dtype=torch.bool)
        if k == numel:
            m.fill_(True)
        elif k > 0:
            for g in range(n_groups):
                m[g, torch.randperm(numel, generator=generator)[:k]] = True
        out[name] = m.reshape(n_groups, *shape)
    return out


class DenseInitializer:
    """All ones: every task sees the whole network (the dense baselines through the same path)."""

    def densities(self, shapes):
        return {n: 1.0 for n in shapes}

    def init_masks(self, shapes, n_groups, generator):
        return draw_masks(self.densities(shapes), shapes, n_groups, generator)


class RandomInitializer(DenseInitializer):
    """The same density in every target, entries drawn uniformly per group.

    Args:
        density: fraction of ones, in (0, 1] (the papers' sparsity S = 1 - density).
    """

    def __init__(self, density: float = 0.8):
        self.density = _check_density(density)

    def densities(self, shapes):
        return {n: self.density for n in shapes}


class ERKInitializer(RandomInitializer):
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, appendix C).

    A target of shape (d_1, …, d_k) gets density ε · Σd / Πd, which for a linear layer is
    ε(n_in + n_out)/(n_in n_out) and for a conv kernel ε(n_in + n_out + w + h)/(n_in n_out w h).
    ε is solved so that the active entries total ``density`` of all target entries:

        Σ_dense numel + ε · Σ_rest (Σd/Πd)·numel = density · Σ_all numel

    Targets whose density would exceed 1 are made dense and ε is solved again over the rest,
    until none exceeds 1. 1-D targets (biases, norms) have raw density Σd/Πd = 1 and are the
    first to be made dense. Exact counts are round(density · numel), so the realised overall
    density may differ from ``density`` by rounding (at most half an entry per target).

    Args:
        density: overall fraction of ones over all targets, in (0, 1].
        power_scale: exponent on the raw ERK density (1 = ERK; 0 = uniform), as in RigL.
    """

    def __init__(self, density: float = 0.8, power_scale: float = 1.0):
        super().__init__(density)
        self.power_scale = float(power_scale)

    def densities(self, shapes):
        numel = {n: _numel(s) for n, s in shapes.items()}
        raw = {n: (sum(int(d) for d in s) / numel[n]) ** self.power_scale for n, s in shapes.items()}
        total = sum(numel.values())
        dense: set[str] = set()
        while True:
            rest = [n for n in shapes if n not in dense]
            if not rest:  # everything dense (density == 1)
                return {n: 1.0 for n in shapes}
            budget = self.density * total - sum(numel[n] for n in dense)
            eps = budget / sum(raw[n] * numel[n] for n in rest)
            over = [n for n in rest if eps * raw[n] > 1.0]
            if not over:
                out = {n: 1.0 for n in dense}
                out.update({n: eps * raw[n] for n in rest})
                return {n: out[n] for n in shapes}
            # Make the densest-by-rule targets dense first, then re-solve.
            top = max(raw[n] for n in over)
            dense.update(n for n in over if raw[n] == top)
