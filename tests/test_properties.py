"""Properties over thousands of random cases: swaps never change a group's density, never drop an
inactive entry nor recover an active one; masked optimizer steps never move an entry outside the
group's mask."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskmtl import MaskedAdamW, MaskSet, RandomScorer, swap


def random_masks(seed: int, groups: int, n_a: int, n_b: int, frac: float):
    """Two targets' random masks ``[G, n_a]`` and ``[G, n_b, 2]`` of density ~``frac``, their flat
    ``[G, n]`` view, active counts per group and an α that every group can swap both ways."""
    g = torch.Generator().manual_seed(seed)
    masks = {"a": torch.rand(groups, n_a, generator=g) < frac, "b": torch.rand(groups, n_b, 2, generator=g) < frac}
    flat = torch.cat([masks["a"].reshape(groups, -1), masks["b"].reshape(groups, -1)], 1)
    active = flat.sum(1)
    limit = int(torch.minimum(active, flat.shape[1] - active).min())
    alpha = int(torch.randint(0, limit + 1, (1,), generator=g)) if limit > 0 else 0
    return g, masks, flat, active, alpha


@settings(max_examples=2000, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 4), n_a=st.integers(2, 30),
       n_b=st.integers(1, 12), ties=st.booleans(), frac=st.floats(0.05, 0.95))
def test_random_swaps_keep_invariants(seed, groups, n_a, n_b, ties, frac):
    g, masks, flat, active, alpha = random_masks(seed, groups, n_a, n_b, frac)

    def scores(shape):
        s = torch.randn(shape, generator=g)
        return s.round() if ties else s  # ties: many equal scores

    res = swap(masks, {k: scores(v.shape) for k, v in masks.items()}, {k: scores(v.shape) for k, v in masks.items()},
               alpha)
    new = torch.cat([res.masks["a"].reshape(groups, -1), res.masks["b"].reshape(groups, -1)], 1)
    dropped = torch.cat([res.dropped["a"].reshape(groups, -1), res.dropped["b"].reshape(groups, -1)], 1)
    recov = torch.cat([res.recovered["a"].reshape(groups, -1), res.recovered["b"].reshape(groups, -1)], 1)
    assert torch.equal(new.sum(1), active)  # density unchanged, every group
    assert not (dropped & ~flat).any() and not (recov & flat).any()  # drop ⊆ active, recover ⊆ inactive
    assert (dropped.sum(1) == alpha).all() and (recov.sum(1) == alpha).all()
    assert torch.equal(new, (flat & ~dropped) | recov)


def test_thousands_of_chained_updates_keep_density():
    g = torch.Generator().manual_seed(0)
    masks = MaskSet({"w": torch.rand(3, 50, generator=g) < 0.6, "v": torch.rand(3, 4, 5, generator=g) < 0.3},
                    ["x", "y", "z"])
    counts = masks.counts().clone()
    for _ in range(3000):
        cur = masks.as_dict()
        res = swap(cur, {k: torch.randn(v.shape, generator=g) for k, v in cur.items()},
                   {k: torch.randn(v.shape, generator=g) for k, v in cur.items()}, alpha=int(torch.randint(0, 9, (1,), generator=g)))
        masks.set_masks(res.masks)
        assert torch.equal(masks.counts(), counts)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), wd=st.sampled_from([0.0, 0.1]))
def test_masked_steps_never_move_entries_outside_the_mask(seed, wd):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(4, 6, generator=g))
    masks = MaskSet({"p": torch.rand(3, 4, 6, generator=g) < 0.5}, ["a", "b", "c"])
    opt = MaskedAdamW([("p", p)], masks, lr=0.05, weight_decay=wd)
    for step in range(8):
        grp = int(torch.randint(0, 3, (1,), generator=g))
        m = masks["p"][grp]
        before = p.detach().clone()
        p.grad = torch.randn(4, 6, generator=g) * m  # a masked gradient, as the masked forward gives
        opt.step(group=grp)
        assert torch.equal(p.detach()[~m], before[~m])


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 3), n_struct=st.integers(2, 12),
       ties=st.booleans(), frac=st.floats(0.1, 0.9), reduce=st.sampled_from(["sum", "mean"]))
def test_random_structured_swaps_keep_invariants_per_structure(seed, groups, n_struct, ties, frac, reduce):
    from maskmtl.structures import Family, StructureMap

    g = torch.Generator().manual_seed(seed)
    # random ids over two targets: every structure gets at least one entry, some entries none (-1)
    flat = torch.cat([torch.arange(n_struct), torch.randint(-1, n_struct, (3 * n_struct,), generator=g)])
    flat = flat[torch.randperm(flat.numel(), generator=g)]
    ids = {"a": flat[:2 * n_struct].reshape(2, n_struct), "b": flat[2 * n_struct:]}
    smap = StructureMap(ids, [Family("unit", "x", 0, n_struct, 1)], reduce=reduce)
    on = torch.rand(groups, n_struct, generator=g) < frac
    masks = smap.to_elements(on)
    active = on.sum(1)
    limit = int(torch.minimum(active, n_struct - active).min())
    alpha = int(torch.randint(0, limit + 1, (1,), generator=g)) if limit > 0 else 0

    def scores():
        out = {k: torch.randn((groups, *v.shape), generator=g) for k, v in ids.items()}
        return {k: s.round() for k, s in out.items()} if ties else out

    res = smap.swap(masks, scores(), scores(), alpha)
    new = smap.to_structures(res.masks)  # raises unless constant within structures, on outside
    dropped, recov = smap.to_structures(res.dropped, check=False), smap.to_structures(res.recovered, check=False)
    assert torch.equal(new.sum(1), active)
    assert not (dropped & ~on).any() and not (recov & on).any()
    assert (dropped.sum(1) == alpha).all() and (recov.sum(1) == alpha).all()
    assert torch.equal(new, (on & ~dropped) | recov)
    for k, t in ids.items():
        assert not res.dropped[k][:, t < 0].any() and res.masks[k][:, t < 0].all()


@settings(max_examples=1000, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10**7), groups=st.integers(1, 4), n_a=st.integers(2, 30),
       n_b=st.integers(1, 12), frac=st.floats(0.05, 0.95))
def test_random_scorer_swaps_keep_invariants(seed, step, groups, n_a, n_b, frac):
    """scorer=random: exact density per group, drop ⊆ active, recover ⊆ inactive (so an entry
    dropped now is not recovered now), exactly α each way, and the same draw for the same step."""
    g, masks, flat, active, alpha = random_masks(seed, groups, n_a, n_b, frac)
    scorer = RandomScorer(seed=seed % 1000)
    scorer.begin_update(step)
    grads = type("G", (), {"dense": {k: torch.zeros(v.shape) for k, v in masks.items()}})()
    drop, grow = scorer.drop_scores(grads, {}, masks), scorer.grow_scores(grads)
    res = swap(masks, drop, grow, alpha)
    new = torch.cat([res.masks["a"].reshape(groups, -1), res.masks["b"].reshape(groups, -1)], 1)
    dropped = torch.cat([res.dropped["a"].reshape(groups, -1), res.dropped["b"].reshape(groups, -1)], 1)
    recov = torch.cat([res.recovered["a"].reshape(groups, -1), res.recovered["b"].reshape(groups, -1)], 1)
    assert torch.equal(new.sum(1), active)
    assert not (dropped & ~flat).any() and not (recov & flat).any() and not (dropped & recov).any()
    assert (dropped.sum(1) == alpha).all() and (recov.sum(1) == alpha).all()
    assert torch.equal(new, (flat & ~dropped) | recov)
    again = RandomScorer(seed=seed % 1000)
    again.begin_update(step)
    res2 = swap(masks, again.drop_scores(grads, {}, masks), again.grow_scores(grads), alpha)
    assert all(torch.equal(res.masks[k], res2.masks[k]) for k in masks)
