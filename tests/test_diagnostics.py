"""The mask update's diagnostics (``MaskUpdater.update``'s ``mask/…`` metrics beyond the swap
itself) equal what is recomputed independently, in plain Python, from the masks before and after
each update, the scores and the gradients, on toy models."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from maskmtl import (AgreementScorer, ConstantScheduler, FisherScorer, MagnitudeScorer, MaskSet, MaskUpdateError,
                     MaskUpdater, RandomInitializer, RandomScorer, estimate_gradients, select_targets)
from toys import INCLUDE, loss_fn, make

TASKS = ["a", "b", "c"]
DIAG_KEYS = {"mask/changed", "mask/changed_share", "mask/drop_zero_score_share", "mask/recover_zero_score_share",
             "mask/drop_zero_grad_share", "mask/recover_zero_grad_share", "mask/drop_jaccard_groups"}
TRACKED_KEYS = {"mask/changed_since_init", "mask/changed_since_init_share"}


def scorers():
    return {"magnitude": MagnitudeScorer(), "fisher_rank": FisherScorer(lam=1.0, weighting="rank"),
            "agreement": AgreementScorer(), "random": RandomScorer(seed=3)}


def setup(kind, seed=0):
    model = make(kind, seed)
    shapes = {t.name: t.shape for t in select_targets(model, INCLUDE)}
    masks = MaskSet(RandomInitializer(0.6).init_masks(shapes, 3, torch.Generator().manual_seed(seed)), TASKS)
    return model, masks


def batches_for(model, n=2):
    def batches(task):
        g = torch.Generator().manual_seed(100 + task)
        return [type(model).inputs(g) for _ in range(n)]
    return batches


def flat(d, names, g):
    """Group g of name -> [G, *P] as one Python list over all targets (target order)."""
    return [x for n in names for x in d[n][g].reshape(-1).tolist()]


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def expected(before, after, init, last_drop, drop_scores, grow_scores, grads, lam_term):
    """Each diagnostic recomputed from its definition, group by group, in plain Python."""
    names = list(before)
    n_groups = before[names[0]].shape[0]
    drops, out = [], {k: [] for k in DIAG_KEYS | TRACKED_KEYS | {"mask/agreement_dominates_share",
                                                                 "mask/drop_jaccard_consecutive"}}
    for g in range(n_groups):
        b, a, i0 = flat(before, names, g), flat(after, names, g), flat(init, names, g)
        dropped = {k for k, (x, y) in enumerate(zip(b, a)) if x and not y}
        recovered = {k for k, (x, y) in enumerate(zip(b, a)) if y and not x}
        drops.append(dropped)
        ds, gs = flat(drop_scores, names, g), flat(grow_scores, names, g)
        mg, dg = flat(grads.masked, names, g), flat(grads.dense, names, g)
        out["mask/changed"].append(len(recovered))
        out["mask/changed_share"].append(len(recovered) / sum(b))
        out["mask/drop_zero_score_share"].append(sum(ds[k] == 0 for k in dropped) / len(dropped))
        out["mask/recover_zero_score_share"].append(sum(gs[k] == 0 for k in recovered) / len(recovered))
        out["mask/drop_zero_grad_share"].append(sum(mg[k] == 0 for k in dropped) / len(dropped))
        out["mask/recover_zero_grad_share"].append(sum(dg[k] == 0 for k in recovered) / len(recovered))
        new_on = sum(1 for x, y in zip(a, i0) if x and not y)
        out["mask/changed_since_init"].append(new_on)
        out["mask/changed_since_init_share"].append(new_on / sum(a))
        if lam_term is not None:
            ta, ti = flat(lam_term[0], names, g), flat(lam_term[1], names, g)
            active = [k for k, x in enumerate(b) if x]
            out["mask/agreement_dominates_share"].append(sum(abs(ta[k]) > abs(ti[k]) for k in active) / len(active))
        if last_drop is not None:
            prev = {k for k, x in enumerate(flat(last_drop, names, g)) if x}
            out["mask/drop_jaccard_consecutive"].append(len(dropped & prev) / len(dropped | prev))
    out["mask/drop_jaccard_groups"] = [len(x & y) / len(x | y) for x, y in itertools.combinations(drops, 2)]
    res = {k: mean(v) for k, v in out.items()}
    return {k: v for k, v in res.items() if v is not None}, drops


def independent_terms(scorer, grads, params, before):
    """(agreement term, importance term) from the definitions, not from the scorer's drop_terms."""
    if isinstance(scorer, RandomScorer) or type(scorer) is AgreementScorer:
        return None
    a = {n: grads.masked[n] * grads.mean[n] for n in before}
    if isinstance(scorer, MagnitudeScorer):
        imp = {n: params[n].abs() * before[n] for n in before}
    else:  # Fisher, log_loss: (ḡ / L)²
        imp = {n: (grads.masked[n] / grads.loss.to(grads.masked[n].dtype).reshape(-1, *[1] * params[n].dim())) ** 2
               for n in before}
    if scorer.weighting == "paper":
        return a, {n: scorer.lam * imp[n] for n in before}
    if scorer.weighting == "published":
        return {n: scorer.lam * a[n] for n in before}, imp
    # rank: percentile ranks among the group's active entries, ties at their mean rank
    def q(vals):
        res = {n: torch.zeros(v.shape, dtype=torch.float64) for n, v in vals.items()}
        for g in range(before[next(iter(before))].shape[0]):
            act = [(n, k) for n in before for k, on in enumerate(before[n][g].reshape(-1).tolist()) if on]
            xs = [vals[n][g].reshape(-1)[k].item() for n, k in act]
            for (n, k), x in zip(act, xs):
                below, same = sum(y < x for y in xs), sum(y == x for y in xs)
                res[n][g].view(-1)[k] = (below + (same - 1) / 2) / (len(xs) - 1)
        return res
    qi = q(imp)
    return q(a), {n: scorer.lam * t for n, t in qi.items()}


def one_update(upd, step, model, masks):
    """Run ``upd`` at ``step`` and return (metrics, before, after, scores, grads, terms)."""
    before = {n: m.clone() for n, m in masks.items()}
    grads = estimate_gradients(model, masks, loss_fn, batches_for(model))
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    probe = upd.scorer
    if isinstance(probe, RandomScorer):  # a separate instance: its draw depends on (seed, step, group) only
        probe = RandomScorer(seed=upd.scorer.seed)
        probe.begin_update(step)
    drop, grow = probe.drop_scores(grads, params, before), probe.grow_scores(grads)
    terms = independent_terms(upd.scorer, grads, params, before)
    metrics = upd.update(step, model, masks, loss_fn, batches_for(model))
    return metrics, before, {n: m.clone() for n, m in masks.items()}, drop, grow, grads, terms


@pytest.mark.parametrize("scorer", ["magnitude", "fisher_rank", "agreement", "random"])
@pytest.mark.parametrize("kind", ["mlp", "embedding", "conv"])
def test_logged_diagnostics_equal_an_independent_recomputation(kind, scorer):
    model, masks = setup(kind)
    upd = MaskUpdater(scorers()[scorer], ConstantScheduler(3), every=1)
    upd.track(masks)
    init = {n: m.clone() for n, m in masks.items()}
    last = None
    for step in (1, 2, 3):
        metrics, before, after, drop, grow, grads, terms = one_update(upd, step, model, masks)
        want, drops = expected(before, after, init, last, drop, grow, grads, terms)
        got = {k: v for k, v in metrics.items() if k in want or k in DIAG_KEYS | TRACKED_KEYS
               or k in ("mask/agreement_dominates_share", "mask/drop_jaccard_consecutive")}
        assert set(got) == set(want), (set(got) ^ set(want))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-12), k
        assert metrics["mask/changed"] == 3  # α entries per group turn on (and as many off)
        assert metrics["time/mask_diagnostics_s"] >= 0
        last = {n: before[n] & ~after[n] for n in before}
    if scorer == "agreement" and kind == "embedding":
        # embedding rows no batch touches have zero gradients: their agreement (H) is exactly 0
        assert metrics["mask/drop_zero_score_share"] > 0 and metrics["mask/drop_zero_grad_share"] > 0


def test_paper_weighting_lets_magnitude_decide():
    """λ = 10 on a toy: λ·|θ| exceeds |A| on nearly every active entry; with rank, about half."""
    model, masks = setup("mlp")
    paper = MaskUpdater(MagnitudeScorer(), ConstantScheduler(2), every=1).update(1, model, masks, loss_fn,
                                                                                  batches_for(model))
    rank = MaskUpdater(MagnitudeScorer(lam=1.0, weighting="rank"), ConstantScheduler(2), every=1).update(
        2, model, masks, loss_fn, batches_for(model))
    assert paper["mask/agreement_dominates_share"] < 0.1
    assert 0.3 < rank["mask/agreement_dominates_share"] < 0.7


def test_untracked_updater_keeps_no_state_and_diagnostics_can_be_off():
    model, masks = setup("mlp")
    upd = MaskUpdater(MagnitudeScorer(), ConstantScheduler(2), every=1)
    m = upd.update(1, model, masks, loss_fn, batches_for(model))
    m = upd.update(2, model, masks, loss_fn, batches_for(model))
    assert DIAG_KEYS <= set(m) and not (TRACKED_KEYS | {"mask/drop_jaccard_consecutive"}) & set(m)
    assert upd.state_dict() == {} and not upd.tracking
    off = MaskUpdater(MagnitudeScorer(), ConstantScheduler(2), every=1, diagnostics=False)
    m = off.update(3, model, masks, loss_fn, batches_for(model))
    assert not (DIAG_KEYS | TRACKED_KEYS) & set(m) and "time/mask_diagnostics_s" not in m
    assert {"mask/alpha", "mask/harmony", "mask/swapped"} <= set(m)
    with pytest.raises(ValueError, match="diagnostics must be a bool"):
        MaskUpdater(MagnitudeScorer(), ConstantScheduler(2), every=1, diagnostics="yes")


def test_tracked_state_survives_a_checkpoint_roundtrip():
    """Three updates uninterrupted, or one, then the updater state through torch.save /
    torch.load(weights_only=True) into a new updater: the same metrics at updates 2 and 3."""
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    model, masks = setup("mlp")
    a = MaskUpdater(FisherScorer(), ConstantScheduler(3), every=1)
    a.track(masks)
    ref = [strip(a.update(s, model, masks, loss_fn, batches_for(model))) for s in (1, 2, 3)]
    model, masks = setup("mlp")
    b = MaskUpdater(FisherScorer(), ConstantScheduler(3), every=1)
    b.track(masks)
    assert strip(b.update(1, model, masks, loss_fn, batches_for(model))) == ref[0]
    buf = io.BytesIO()
    torch.save({"updater": b.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["updater"]
    c = MaskUpdater(FisherScorer(), ConstantScheduler(3), every=1)
    c.load_state_dict(state)
    assert c.tracking
    got = [strip(c.update(s, model, masks, loss_fn, batches_for(model))) for s in (2, 3)]
    assert got == ref[1:] and "mask/drop_jaccard_consecutive" in got[0]
    c.load_state_dict({})
    assert not c.tracking
    with pytest.raises(MaskUpdateError, match="'initial'"):
        c.load_state_dict({"last": None})


def test_tracked_masks_that_no_longer_fit_are_an_error():
    model, masks = setup("mlp")
    upd = MaskUpdater(MagnitudeScorer(), ConstantScheduler(2), every=1)
    upd.track({n: m[:2] for n, m in masks.items()})  # two groups; the masks have three
    with pytest.raises(MaskUpdateError, match="call track"):
        upd.update(1, model, masks, loss_fn, batches_for(model))
    with pytest.raises(MaskUpdateError, match="bool masks"):
        upd.track({n: m.float() for n, m in masks.items()})


@pytest.mark.parametrize("kind,granularity", [("mlp", "unit"), ("heads", "head")])
def test_structured_updates_report_entries(kind, granularity):
    """With structured masks the swap moves whole structures; the diagnostics count entries and
    still equal the independent recomputation."""
    from maskmtl.structures import build_structures

    model = make(kind, 0)
    names = [t.name for t in select_targets(model, INCLUDE)]
    smap = build_structures(model, names, granularity, type(model).inputs(torch.Generator().manual_seed(0)))
    masks = MaskSet(smap.init_masks(RandomInitializer(0.5), 3, torch.Generator().manual_seed(0)), TASKS)
    size = smap.structured_numel() / smap.n_structures
    upd = MaskUpdater(MagnitudeScorer(), ConstantScheduler(int(size) + 1), every=1, structures=smap)
    upd.track(masks)
    init = {n: m.clone() for n, m in masks.items()}
    for step in (1, 2):
        metrics, before, after, drop, grow, grads, terms = one_update(upd, step, model, masks)
        want, _ = expected(before, after, init, None, drop, grow, grads, terms)
        for k, v in want.items():
            if k in metrics:
                assert metrics[k] == pytest.approx(v, abs=1e-12), k
        assert set(want) - set(metrics) <= {"mask/drop_jaccard_consecutive"}
        assert metrics["mask/changed"] > metrics["mask/alpha"] / 2  # whole structures: many entries each
