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


# ---- weighting="rank" (maskmtl's variant): H = q(A) + λ·q(I), q = percentile rank among active entries
#   one task = one group, so ĝ = ḡ and A = ḡ² ;  ḡ = [1, 1, -1, 2, 0], mask [1, 1, 1, 1, 0]
#   θ = [0.1, 3, 2, 0.5, 5] -> I_M = |θ ⊙ M| = [0.1, 3, 2, 0.5, 0]
#   A on the 4 active entries = [1, 1, 1, 4]: the three 1s share ranks 1..3 (mean 2), 4 has rank 4
#     q(A) = (rank − 1)/(4 − 1) = [1/3, 1/3, 1/3, 1]
#   I on the active entries = [0.1, 3, 2, 0.5]: ranks [1, 4, 3, 2] -> q(I) = [0, 1, 2/3, 1/3]
#   λ = 1: H = [1/3, 4/3, 1, 4/3], inactive entry 0
#   paper, λ = 10: H = A + 10 I = [2, 31, 21, 9]  (magnitude decides: entry 3, A = 4, is dropped 2nd)
RANK_MASKS = {"w": torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)}
RANK_PARAMS = {"w": torch.tensor([0.1, 3.0, 2.0, 0.5, 5.0])}


def rank_grads() -> GroupGradients:
    g = torch.tensor([[1.0, 1.0, -1.0, 2.0, 0.0]])
    return _group_sums({"w": g}, {"w": g.clone()}, torch.tensor([1.0], dtype=torch.float64), [0])


def test_rank_weighting_golden():
    h = MagnitudeScorer(lam=1, weighting="rank").drop_scores(rank_grads(), RANK_PARAMS, RANK_MASKS)["w"]
    torch.testing.assert_close(h, torch.tensor([[1 / 3, 4 / 3, 1.0, 4 / 3, 0.0]], dtype=torch.float64))
    a, i = MagnitudeScorer(lam=2, weighting="rank").drop_terms(rank_grads(), RANK_PARAMS, RANK_MASKS)  # (q(A), λ·q(I))
    torch.testing.assert_close(a["w"], torch.tensor([[1 / 3, 1 / 3, 1 / 3, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(i["w"], torch.tensor([[0.0, 2.0, 4 / 3, 2 / 3, 0.0]], dtype=torch.float64))
    paper = MagnitudeScorer(lam=10).drop_scores(rank_grads(), RANK_PARAMS, RANK_MASKS)["w"]
    torch.testing.assert_close(paper, torch.tensor([[2.0, 31.0, 21.0, 9.0, 0.0]]))
    # α = 2: the paper drops the two smallest magnitudes {0, 3}; rank keeps entry 3 (highest agreement)
    grow = AgreementScorer().grow_scores(rank_grads())
    grow["w"][0, 4] = 1.0  # one inactive entry; its recovery is the same either way
    with pytest.raises(MaskUpdateError):  # only one inactive entry: α = 2 cannot be recovered
        swap(RANK_MASKS, {"w": h}, grow, alpha=2)
    wide = {"w": torch.cat([RANK_MASKS["w"], torch.zeros(1, 1, dtype=torch.bool)], 1)}
    pad = lambda t: torch.cat([t, torch.zeros(1, 1, dtype=t.dtype)], 1)  # noqa: E731
    got_rank = swap(wide, {"w": pad(h)}, {"w": pad(grow["w"])}, alpha=2).dropped["w"][0].nonzero().flatten().tolist()
    got_paper = swap(wide, {"w": pad(paper)}, {"w": pad(grow["w"])}, alpha=2).dropped["w"][0].nonzero().flatten().tolist()
    assert got_paper == [0, 3] and got_rank == [0, 2]


def test_rank_weighting_over_groups_and_targets():
    # golden_grads, magnitude, λ = 2. Group 0 (all active): q(A) of [1.5, 1, 0.125] = [1, 0.5, 0],
    # q(I) of [0.5, 1, 2] = [0, 0.5, 1] -> H = [1, 1.5, 2]. Group 1 (entries 0, 1 active):
    # q(A) of [3, -0.5] = [1, 0], q(I) of [0.5, 1] = [0, 1] -> H = [1, 2, 0].
    h = MagnitudeScorer(lam=2, weighting="rank").drop_scores(golden_grads(), PARAMS, MASKS)["w"]
    torch.testing.assert_close(h, torch.tensor([[1.0, 1.5, 2.0], [1.0, 2.0, 0.0]], dtype=torch.float64))
    # ranking is over all targets of a group together: splitting "w" into two targets changes nothing
    from maskmtl.scorers import percentile_ranks

    vals = {"a": torch.tensor([[1.5, 1.0]]), "b": torch.tensor([[0.125]])}
    q = percentile_ranks(vals, {"a": torch.ones(1, 2, dtype=torch.bool), "b": torch.ones(1, 1, dtype=torch.bool)})
    assert q["a"].tolist() == [[1.0, 0.5]] and q["b"].tolist() == [[0.0]]
    one = percentile_ranks({"w": torch.tensor([[7.0, 3.0]])}, {"w": torch.tensor([[False, True]])})
    assert one["w"].tolist() == [[0.0, 0.5]]  # a single active entry: 0.5; inactive: 0


# ---- α as a share of the active entries (scheduler.unit=share) ----------------------------

def _share_masks(active: list[int], numel: int = 2000) -> MaskSet:
    """One target of ``numel`` entries; group g has its first ``active[g]`` entries on."""
    m = torch.zeros(len(active), numel, dtype=torch.bool)
    for g, a in enumerate(active):
        m[g, :a] = True
    return MaskSet({"w": m.reshape(len(active), 40, numel // 40)}, [f"t{g}" for g in range(len(active))])


def test_share_of_active_entries_golden():
    from maskmtl import ConstantScheduler, check_schedule
    from maskmtl.schedulers import share_to_count

    # ⌈0.01 · 1234⌉ = ⌈12.34⌉ = 13; 0.07 · 100 = 7.000000000000001 in floats, still 7; 0 stays 0
    assert share_to_count(0.01, 1234) == 13 and share_to_count(0.07, 100) == 7 and share_to_count(0.0, 500) == 0
    assert share_to_count(1e-6, 1000) == 1  # any share > 0 swaps at least one entry
    # groups of 1000 and 800 active entries: the smallest group's 800 sets the count, ⌈0.01 · 800⌉ = 8
    s = CosineScheduler(eta_min=0, eta_max=0.01, total_steps=100, unit="share")
    assert not s.converted and s.max_alpha() == 1  # before the masks are known: a lower bound
    with pytest.raises(RuntimeError, match="check_schedule"):
        s.alpha(50)
    check_schedule(s, _share_masks([1000, 800]))
    assert s.converted and s.active == 800 and (s.eta_min, s.eta_max) == (0, 8)
    assert [s.alpha(t) for t in (0, 25, 50, 75, 100)] == [0, 4, 8, 4, 0]  # ⌈8 − 4(1 + cos(πt/50))⌉
    # eta_min converts too: ⌈0.005 · 1000⌉ = 5, ⌈0.02 · 1000⌉ = 20
    s2 = CosineScheduler(eta_min=0.005, eta_max=0.02, total_steps=10, unit="share")
    check_schedule(s2, _share_masks([1000, 1000]))
    assert [s2.alpha(t) for t in (0, 5, 10)] == [5, 20, 5] and s2.max_alpha() == 20
    c = ConstantScheduler(alpha=0.03, unit="share")
    check_schedule(c, _share_masks([1000, 900]))
    assert c.alpha(1) == 27 and c.max_alpha() == 27  # ⌈0.03 · 900⌉
    # the converted count is still checked against the groups: 0.9 of 1000 active but 1000 inactive is
    # fine, 0.9 of 1500 active (500 inactive) is not
    check_schedule(ConstantScheduler(alpha=0.9, unit="share"), _share_masks([1000, 1000]))
    with pytest.raises(MaskUpdateError, match="alpha reaches 1350"):
        check_schedule(ConstantScheduler(alpha=0.9, unit="share"), _share_masks([1500, 1500]))
    # unit=count is unchanged: counts, no conversion
    n = CosineScheduler(eta_min=0, eta_max=100, total_steps=1000)
    check_schedule(n, _share_masks([1000, 800]))
    assert n.unit == "count" and n.alpha(500) == 100


def test_share_of_active_structures_golden():
    from maskmtl import check_schedule
    from maskmtl.structures import build_structures

    # Linear(4, 20) -> ReLU -> Linear(20, 1): 20 units of 4 weights + 1 bias + 1 column = 6 entries each
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 1))
    smap = build_structures(model, ["0.weight", "0.bias", "2.weight"], "unit", torch.randn(1, 4), reduce="sum")
    on = torch.zeros(2, 20, dtype=torch.bool)
    on[0, :10], on[1, :12] = True, True  # 10 and 12 active units
    masks = MaskSet(smap.to_elements(on), ["a", "b"])
    s = CosineScheduler(eta_min=0, eta_max=0.25, total_steps=100, unit="share")
    check_schedule(s, masks, structures=smap)
    # ⌈0.25 · 10⌉ = 3 structures; 13 is the smallest entry count that ⌈e / 6⌉ turns into 3
    assert s.active == 10 and s.eta_max == 13 and smap.alpha(s.alpha(50)) == 3


@pytest.mark.parametrize("kwargs,key", [
    ({"eta_max": 1.0, "unit": "share"}, "scheduler.eta_max=1.0"),
    ({"eta_max": 0.1, "eta_min": -0.01, "unit": "share"}, "scheduler.eta_min=-0.01"),
    ({"eta_max": "a", "unit": "share"}, "scheduler.eta_max='a'"),
    ({"eta_max": 0.5}, "scheduler.eta_max"),  # a fraction is not a count
    ({"unit": "percent"}, "scheduler.unit='percent'"),
])
def test_share_schedule_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        CosineScheduler(total_steps=10, **kwargs)
