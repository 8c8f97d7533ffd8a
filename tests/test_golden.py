"""Layer 3: golden numbers for the maths, worked by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskmtl import (AgreementScorer, CosineScheduler, ERKInitializer, FisherScorer, MagnitudeScorer, MaskSet,
                     MaskUpdateError, estimate_gradients, masks_from_scores, swap)
from maskmtl.gradients import GroupGradients, _group_sums, harmony

# Two tasks, three weights (one target "w"), one group per task.
#   ḡ_1 = [1, -2, 0.5]  mask M_1 = [1, 1, 1]   L_1 = 2
#   ḡ_2 = [2,  1, 0  ]  mask M_2 = [1, 1, 0]   L_2 = 0.5
#   g_1 = [1, -2, 0.5]  g_2 = [2, 1, 3]          (dense gradients, informative where M_2 = 0)
#   ĝ   = mean ḡ = [1.5, -0.5, 0.25]            θ = [0.5, -1, 2]
G1, G2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 1.0, 0.0])
MASKS = {"w": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)}
PARAMS = {"w": torch.tensor([0.5, -1.0, 2.0])}


def golden_grads() -> GroupGradients:
    return _group_sums({"w": torch.stack([G1, G2])}, {"w": torch.stack([G1, torch.tensor([2.0, 1.0, 3.0])])},
                       torch.tensor([2.0, 0.5], dtype=torch.float64), [0, 1])


def test_mean_and_agreement():
    g = golden_grads()
    torch.testing.assert_close(g.mean["w"], torch.tensor([1.5, -0.5, 0.25]))
    # A_1 = ḡ_1 ⊙ ĝ = [1.5, 1.0, 0.125];  A_2 = [3.0, -0.5, 0]
    torch.testing.assert_close(AgreementScorer().drop_scores(g, PARAMS, MASKS)["w"],
                               torch.tensor([[1.5, 1.0, 0.125], [3.0, -0.5, 0.0]]))


def test_fisher_scores():
    # I_F = (ḡ/L)²: task 1 [0.25, 1, 0.0625], task 2 [16, 4, 0];  H = A + 10 I
    h = FisherScorer(lam=10).drop_scores(golden_grads(), PARAMS, MASKS)["w"]
    torch.testing.assert_close(h, torch.tensor([[4.0, 11.0, 0.75], [163.0, 39.5, 0.0]]))


def test_fisher_published_variant():
    # λ·A + ḡ²: task 1 [15 + 1, 10 + 4, 1.25 + 0.25], task 2 [30 + 4, -5 + 1, 0]
    h = FisherScorer(lam=10, weighting="published", log_loss=False).drop_scores(golden_grads(), PARAMS, MASKS)["w"]
    torch.testing.assert_close(h, torch.tensor([[16.0, 14.0, 1.5], [34.0, -4.0, 0.0]]))


def test_magnitude_scores():
    # I_M = |θ ⊙ M|: task 1 [0.5, 1, 2], task 2 [0.5, 1, 0];  H = A + 10 I
    h = MagnitudeScorer(lam=10).drop_scores(golden_grads(), PARAMS, MASKS)["w"]
    torch.testing.assert_close(h, torch.tensor([[6.5, 11.0, 20.125], [8.0, 9.5, 0.0]]))


def test_recovery_scores_use_dense_gradients():
    # R = g ⊙ ĝ: task 2 [3, -0.5, 0.75]; its inactive entry 2 scores 0.75, not 0
    r = AgreementScorer().grow_scores(golden_grads())["w"]
    torch.testing.assert_close(r, torch.tensor([[1.5, 1.0, 0.125], [3.0, -0.5, 0.75]]))


def test_swap_golden():
    # Task 2 (Fisher H = [163, 39.5, ·]): drop entry 1 (lowest active); recover entry 2 (only inactive).
    g = golden_grads()
    drop, grow = FisherScorer().drop_scores(g, PARAMS, MASKS), AgreementScorer().grow_scores(g)
    res = swap({"w": MASKS["w"][1:]}, {"w": drop["w"][1:]}, {"w": grow["w"][1:]}, alpha=1)
    assert res.masks["w"][0].tolist() == [True, False, True]
    assert res.dropped["w"][0].tolist() == [False, True, False]
    assert res.recovered["w"][0].tolist() == [False, False, True]
    # Task 1 has no inactive entry: alpha=1 cannot be recovered -> an error, not a silent shrink.
    with pytest.raises(MaskUpdateError, match="group 0: alpha=1 exceeds"):
        swap(MASKS, drop, grow, alpha=1)


def test_swap_exact_counts_over_several_targets():
    gen = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(3, 40, generator=gen) < 0.5, "b": torch.rand(3, 8, 5, generator=gen) < 0.7}
    drop = {k: torch.randn(v.shape, generator=gen) for k, v in masks.items()}
    grow = {k: torch.randn(v.shape, generator=gen) for k, v in masks.items()}
    res = swap(masks, drop, grow, alpha=7)
    for gi in range(3):
        flat_old = torch.cat([masks[k][gi].flatten() for k in masks])
        flat_new = torch.cat([res.masks[k][gi].flatten() for k in masks])
        assert int(flat_new.sum()) == int(flat_old.sum())
        assert int((flat_old & ~flat_new).sum()) == 7 and int((~flat_old & flat_new).sum()) == 7
        # the dropped are the 7 lowest drop scores among active entries
        d = torch.cat([drop[k][gi].flatten() for k in masks])
        expect = torch.topk(d.masked_fill(~flat_old, math.inf), 7, largest=False).indices
        got = torch.cat([res.dropped[k][gi].flatten() for k in masks]).nonzero().flatten()
        assert sorted(expect.tolist()) == sorted(got.tolist())


def test_cosine_schedule_golden():
    s = CosineScheduler(eta_min=0, eta_max=100, total_steps=1000)
    assert s.alpha(0) == 0 and s.alpha(500) == 100 and s.alpha(1000) == 0
    assert s.alpha(250) == 50 and s.alpha(750) == 50  # ⌈100 − 50(1 + cos(π/2))⌉
    assert s.alpha(1) == 1  # ⌈100 − 50(1 + cos(2π/1000))⌉ = ⌈0.000987⌉
    s2 = CosineScheduler(eta_min=10, eta_max=30, total_steps=100)
    assert [s2.alpha(t) for t in (0, 50, 100)] == [10, 30, 10]
    assert s2.alpha(25) == 20 and s2.max_alpha() == 30


def test_erk_densities_golden():
    # raw density Σd/Πd: a [4,6] -> 10/24, b [8,4,3,3] -> 18/288, c [10] -> 1; total 322 entries, budget 161.
    # ε = 161/38 makes c > 1 -> c dense; ε = 151/28 makes a > 1 -> a dense; ε = 127/18 -> b = 127/288.
    shapes = {"a": (4, 6), "b": (8, 4, 3, 3), "c": (10,)}
    d = ERKInitializer(density=0.5).densities(shapes)
    assert d["a"] == 1.0 and d["c"] == 1.0
    assert d["b"] == pytest.approx(127 / 288, rel=1e-12)
    m = ERKInitializer(density=0.5).init_masks(shapes, 2, torch.Generator().manual_seed(0))
    assert m["b"].reshape(2, -1).sum(1).tolist() == [127, 127]
    # without any layer hitting 1: two equal linear layers get equal density = target
    d2 = ERKInitializer(density=0.3).densities({"x": (20, 30), "y": (30, 20)})
    assert d2["x"] == pytest.approx(0.3) and d2["y"] == pytest.approx(0.3)
    # the ratio between layers follows the ERK rule
    d3 = ERKInitializer(density=0.2).densities({"x": (100, 100), "y": (10, 100)})
    assert d3["y"] / d3["x"] == pytest.approx((110 / 1000) / (200 / 10000))


def test_masks_from_scores_keeps_the_top_fraction():
    scores = {"a": torch.tensor([[5.0, 1.0, 3.0]]), "b": torch.tensor([[[4.0, 0.0], [2.0, 6.0]]])}
    m = masks_from_scores(scores, density=0.5)  # 7 entries -> keep 4: 6, 5, 4, 3
    assert m["a"].tolist() == [[True, False, True]] and m["b"].tolist() == [[[True, False], [False, True]]]


def test_harmony_golden():
    # sign(ḡ_1 ⊙ ĝ) over its 3 active entries = [+, +, +] -> 1; task 2 over its 2 active: [+, −] -> 0
    assert harmony(golden_grads(), MASKS) == pytest.approx(0.5)


class Linear1(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return x @ self.w


def test_estimated_gradients_match_analytic_values():
    """L_i = (x·(θ⊙M) − t_i)²; ∂L/∂w = 2(x·w − t_i)x. Recovery must see the real gradient at
    inactive entries: dense g_i = 2(x·θ − t_i)x, not zero."""
    model = Linear1()
    masks = MaskSet({"w": torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)}, ["t0", "t1"])
    x = torch.tensor([1.0, 2.0, -1.0])
    targets = [0.0, 3.0]

    def loss_fn(forward, task, batch):
        return (forward(batch) - targets[task]) ** 2

    g = estimate_gradients(model, masks, loss_fn, lambda i: [x], recovery="dense")
    theta = model.w.detach()
    w1 = theta * torch.tensor([1.0, 0.0, 1.0])  # task 1's masked weights
    r1 = x @ w1 - 3.0  # = 0.5 - 2 - 3 = -4.5
    torch.testing.assert_close(g.task_masked["w"][1], 2 * r1 * x * torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(g.dense["w"][1], 2 * (x @ theta - 3.0) * x)
    assert g.dense["w"][1][1] != 0
    torch.testing.assert_close(g.task_loss[1], (r1**2).double())
    gm = estimate_gradients(model, masks, loss_fn, lambda i: [x], recovery="masked_point")
    torch.testing.assert_close(gm.dense["w"][1], 2 * r1 * x)  # at θ⊙M, without the final ⊙M


def test_voting_mask_counts_and_fractions():
    # 4 tasks, tasks c and d share group 2. Votes per entry: [4, 1 + 1, 1 + 2, 0] = [4, 2, 3, 0]
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    ms = MaskSet({"w": m}, ["a", "b", "c", "d"], [0, 1, 2, 2])
    assert ms.voting_mask(2)["w"].tolist() == [True, False, True, False]  # strictly more than 2 votes
    assert ms.voting_mask(0.5)["w"].tolist() == [True, False, True, False]  # > 0.5 · 4 tasks
    assert ms.voting_mask(0)["w"].tolist() == [True, True, True, False]
