"""Layer 2: contract tests of every plug-in and of masked training on toy modules of every kind."""

from __future__ import annotations

import copy

import pytest
import torch

from maskmtl import (AgreementScorer, ConstantScheduler, CosineScheduler, DenseInitializer, ERKInitializer,
                     FisherScorer, KNNGrouper, MagnitudeScorer, MaskedAdamW, MaskedModel, MaskSet, MaskUpdater,
                     NoneGrouper, RandomInitializer, RandomScorer, estimate_gradients, load_masks, read_masks_file,
                     save_masks, select_targets)
from maskmtl.interfaces import Grouper, Initializer, Scheduler, Scorer
from toys import INCLUDE, TOYS, loss_fn, make

INITIALIZERS = {"dense": DenseInitializer(), "random": RandomInitializer(0.6), "erk": ERKInitializer(0.6)}
SCORERS = {"agreement": AgreementScorer(), "magnitude": MagnitudeScorer(), "fisher": FisherScorer(),
           "fisher_published": FisherScorer(weighting="published", log_loss=False),
           "magnitude_rank": MagnitudeScorer(lam=1.0, weighting="rank"), "fisher_rank": FisherScorer(lam=1.0, weighting="rank"),
           "random": RandomScorer(seed=0)}
TASKS = ["a", "b", "c"]


def setup(kind, init="random", n_groups=3, seed=0):
    model = make(kind, seed)
    targets = select_targets(model, INCLUDE)
    shapes = {t.name: t.shape for t in targets}
    masks = MaskSet(INITIALIZERS[init].init_masks(shapes, n_groups, torch.Generator().manual_seed(seed)), TASKS,
                    list(range(n_groups)) if n_groups == 3 else [0, 1, 1])
    return model, masks


def batches_for(model_cls, n=2):
    def batches(task):
        g = torch.Generator().manual_seed(100 + task)
        return [model_cls.inputs(g) for _ in range(n)]
    return batches


def test_protocols_are_satisfied():
    for s in SCORERS.values():
        assert isinstance(s, Scorer)
    for i in INITIALIZERS.values():
        assert isinstance(i, Initializer)
    assert isinstance(CosineScheduler(0, 10, 100), Scheduler) and isinstance(ConstantScheduler(3), Scheduler)
    assert isinstance(NoneGrouper(), Grouper) and isinstance(KNNGrouper(2), Grouper)


@pytest.mark.parametrize("kind", TOYS)
def test_tied_weights_are_one_target(kind):
    model = make(kind)
    names = [t.name for t in select_targets(model, INCLUDE)]
    assert len(names) == len(set(names))
    if kind == "tied":
        assert "emb.weight" in names and "proj.weight" not in names


@pytest.mark.parametrize("init", INITIALIZERS)
@pytest.mark.parametrize("kind", TOYS)
def test_initializer_contract(kind, init):
    model = make(kind)
    shapes = {t.name: t.shape for t in select_targets(model, INCLUDE)}
    ini = INITIALIZERS[init]
    dens = ini.densities(shapes)
    masks = ini.init_masks(shapes, 4, torch.Generator().manual_seed(7))
    again = ini.init_masks(shapes, 4, torch.Generator().manual_seed(7))
    for n, shape in shapes.items():
        m = masks[n]
        assert m.dtype == torch.bool and tuple(m.shape) == (4, *shape)
        numel = m[0].numel()
        assert 0.0 < dens[n] <= 1.0
        # exact counts in every group row
        assert m.reshape(4, -1).sum(1).tolist() == [int(round(dens[n] * numel))] * 4
        assert torch.equal(m, again[n]), "same generator seed must give the same masks"


@pytest.mark.parametrize("kind", TOYS)
def test_masked_forward_and_gradient_equal_explicit_masking(kind):
    model, masks = setup(kind)
    mm = MaskedModel(model, masks)
    x = type(model).inputs(torch.Generator().manual_seed(3))
    task = 1
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = mm(task, *x)
    loss = loss_fn(lambda *a: mm(task, *a), task, x)
    loss.backward()
    # reference: a copy whose weights are multiplied by the mask in place
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks.names:
                p.mul_(masks[n][task])
    ref_out = ref(*x)
    torch.testing.assert_close(out, ref_out)
    loss_fn(ref, task, x).backward()
    refp = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if n in masks.names:
            # ∇L(θ⊙M)⊙M: the reference's gradient at masked weights, times the mask
            torch.testing.assert_close(p.grad, refp[n].grad * masks[n][task])
            assert (p.grad[~masks[n][task]] == 0).all()
    # θ itself is untouched by the masked forward and backward
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta[n]), n


@pytest.mark.parametrize("kind", TOYS)
def test_masked_adamw_leaves_outside_entries_bit_identical(kind):
    model, masks = setup(kind)
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    # warm every entry's moments with dense steps, so stale momentum would move masked entries
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, 0, type(model).inputs(g)).backward()
        opt.step(group=None)
    for step in range(6):
        task = step % 3
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        st = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
              for n, p in model.named_parameters() if n in masks.names}
        opt.zero_grad()
        loss_fn(mm.bind(task), task, type(model).inputs(g)).backward()
        opt.step(group=masks.group_of(task))
        for n, p in model.named_parameters():
            if n not in masks.names:
                continue
            off = ~masks[n][masks.group_of(task)]
            assert torch.equal(p.detach()[off], before[n][off]), f"{n}: masked-out value moved"
            assert torch.equal(opt.state[p]["exp_avg"][off], st[n][0][off])
            assert torch.equal(opt.state[p]["exp_avg_sq"][off], st[n][1][off])
            on = masks[n][masks.group_of(task)]
            if on.any() and p.grad[on].abs().sum() > 0:
                assert not torch.equal(p.detach()[on], before[n][on]), f"{n}: active entries did not move"


@pytest.mark.parametrize("kind", TOYS)
def test_masked_adamw_with_full_masks_matches_torch_adamw(kind):
    model, masks = setup(kind, init="dense")
    ref = copy.deepcopy(model)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = type(model).inputs(g)
        opt.zero_grad(), ref_opt.zero_grad()
        loss_fn(MaskedModel(model, masks).bind(step % 3), step % 3, x).backward()
        loss_fn(ref, step % 3, x).backward()
        opt.step(group=step % 3)
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("kind", TOYS)
def test_scorer_and_update_contract(kind, scorer):
    model, masks = setup(kind, n_groups=2)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-3)
    grads = estimate_gradients(model, masks, loss_fn, batches_for(type(model)))
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    drop = SCORERS[scorer].drop_scores(grads, params, masks.as_dict())
    grow = SCORERS[scorer].grow_scores(grads)
    for n, m in masks.items():
        assert drop[n].shape == m.shape and grow[n].shape == m.shape
        assert torch.isfinite(drop[n]).all() and torch.isfinite(grow[n]).all()
    before = {n: m.clone() for n, m in masks.items()}
    counts = masks.counts().clone()
    alpha = 3
    upd = MaskUpdater(SCORERS[scorer], ConstantScheduler(alpha), every=1)
    metrics = upd.update(1, model, masks, loss_fn, batches_for(type(model)), optimizer=opt)
    assert torch.equal(masks.counts(), counts), "density changed"
    changed = sum(int((masks[n] != before[n]).reshape(2, -1).sum()) for n in masks.names)
    assert changed == 2 * alpha * 2 and metrics["mask/swapped"] == 2 * alpha * 2
    assert -1.0 <= metrics["mask/harmony"] <= 1.0


@pytest.mark.parametrize("kind", TOYS)
def test_save_load_roundtrip_and_mismatches(kind, tmp_path):
    model, masks = setup(kind, n_groups=2)
    path = tmp_path / "masks.safetensors"
    save_masks(masks, path)
    _, other = setup(kind, n_groups=3, seed=5)
    load_masks(other, path)  # regrouping to the file's 2 groups is allowed
    assert other.task_to_group == masks.task_to_group and other.tasks == masks.tasks
    for n in masks.names:
        assert other[n].dtype == torch.bool and torch.equal(other[n], masks[n])
    # save(load(x)) holds the same tensors and metadata (the header's key order may differ)
    save_masks(other, tmp_path / "again.safetensors")
    a, b = read_masks_file(path), read_masks_file(tmp_path / "again.safetensors")
    assert a[1:] == b[1:] and a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) and b[0][k].dtype == torch.bool for k in a[0])


def test_load_refuses_mismatches(tmp_path):
    from maskmtl import MaskError

    model, masks = setup("mlp", n_groups=3)
    path = tmp_path / "m.safetensors"
    save_masks(masks, path)
    wrong_tasks = MaskSet(masks.as_dict(), ["a", "b", "x"])
    with pytest.raises(MaskError, match="tasks"):
        load_masks(wrong_tasks, path)
    fewer = MaskSet({masks.names[0]: masks[masks.names[0]]}, TASKS)
    with pytest.raises(MaskError, match="missing|unexpected"):
        load_masks(fewer, path)
    _, conv_masks = setup("conv")
    with pytest.raises(MaskError):
        load_masks(conv_masks, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(MaskError, match="not a readable"):
        load_masks(masks, path)


@pytest.mark.parametrize("algorithm", KNNGrouper.ALGORITHMS)
def test_grouper_recovers_planted_clusters(algorithm):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 200, generator=g) * 3
    truth = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    vectors = centers[truth] + 0.3 * torch.randn(12, 200, generator=g)
    grouper = KNNGrouper(n_groups=3, algorithm=algorithm, n_neighbors=3)
    groups = grouper.group(vectors, seed=0)
    assert groups == truth  # canonical numbering = first appearance
    assert grouper.group(vectors, seed=0) == groups
    assert NoneGrouper().group(vectors, seed=0) == list(range(12))


def test_mask_state_dict_survives_regrouping():
    """A checkpoint taken after grouping (2 groups) loads into a fresh one-group-per-task MaskSet."""
    _, masks = setup("mlp", n_groups=2)
    _, fresh = setup("mlp", n_groups=3, seed=9)
    fresh.load_state_dict(masks.state_dict())
    assert fresh.task_to_group == [0, 1, 1] and fresh.n_groups == 2
    assert all(torch.equal(fresh[n], masks[n]) for n in masks.names)


# ---- the random control -----------------------------------------------------------------------
def _updated(kind, scorer, steps, masks=None):
    model, fresh = setup(kind, n_groups=2)
    masks = fresh if masks is None else masks
    upd = MaskUpdater(scorer, ConstantScheduler(3), every=1)
    for step in steps:
        upd.update(step, model, masks, loss_fn, batches_for(type(model)))
    return masks


def test_random_scorer_is_seeded_by_seed_step_and_group_only():
    a, b = _updated("mlp", RandomScorer(seed=4), [5, 10, 15]), _updated("mlp", RandomScorer(seed=4), [5, 10, 15])
    assert all(torch.equal(a[n], b[n]) for n in a.names)
    # kill and resume: a new scorer (no state carried over) continuing from the masks at step 10
    resumed = _updated("mlp", RandomScorer(seed=4), [15], masks=_updated("mlp", RandomScorer(seed=4), [5, 10]))
    assert all(torch.equal(a[n], resumed[n]) for n in a.names)
    other_seed, other_steps = _updated("mlp", RandomScorer(seed=5), [5, 10, 15]), _updated("mlp", RandomScorer(seed=4), [6, 10, 15])
    assert any(not torch.equal(a[n], other_seed[n]) for n in a.names)
    assert any(not torch.equal(a[n], other_steps[n]) for n in a.names)
    s = RandomScorer(seed=4)
    s.begin_update(7)
    like = {"w": torch.zeros(3, 50)}
    d, g = s._scores(like, s.DROP)["w"], s._scores(like, s.GROW)["w"]
    assert not torch.equal(d, g) and not torch.equal(d[0], d[1])  # drop vs recovery, and groups, are independent
    assert sorted(d[0].tolist()) == [float(k) for k in range(1, 51)]  # a permutation of 1..|θ|: no ties, no zero


def test_random_scorer_ignores_gradients_for_dropping_and_recovering():
    model, masks = setup("mlp", n_groups=2)
    grads = estimate_gradients(model, masks, loss_fn, batches_for(type(model)))
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    s = RandomScorer(seed=1)
    s.begin_update(3)
    d1, g1 = s.drop_scores(grads, params, masks.as_dict()), s.grow_scores(grads)
    for t in list(grads.masked.values()) + list(grads.dense.values()):
        t.mul_(-7.0).add_(1.0)
    d2, g2 = s.drop_scores(grads, {n: p * 3 for n, p in params.items()}, masks.as_dict()), s.grow_scores(grads)
    assert all(torch.equal(d1[n], d2[n]) and torch.equal(g1[n], g2[n]) for n in masks.names)


def test_random_swaps_are_uniform_over_active_and_inactive_entries():
    """One group, 6 active and 4 inactive entries, α = 2, 3000 updates from the same masks: each
    active entry is dropped 2/6 and each inactive one recovered 2/4 of the times (within 10 %)."""
    from maskmtl import swap

    mask = {"w": torch.tensor([[1, 1, 1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)}
    s = RandomScorer(seed=0)
    grads = type("G", (), {"dense": {"w": torch.zeros(1, 10)}})()
    drops, recs = torch.zeros(10), torch.zeros(10)
    for step in range(3000):
        s.begin_update(step)
        res = swap(mask, s.drop_scores(grads, {}, mask), s.grow_scores(grads), 2)
        drops += res.dropped["w"][0].float()
        recs += res.recovered["w"][0].float()
    act = mask["w"][0]
    assert (drops[~act] == 0).all() and (recs[act] == 0).all()
    assert ((drops[act] - 1000).abs() < 100).all(), drops
    assert ((recs[~act] - 1500).abs() < 150).all(), recs


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_random_scorer_refuses_a_bad_seed(bad):
    with pytest.raises(ValueError, match="scorer.seed"):
        RandomScorer(seed=bad)


def test_random_scorer_config_errors_name_the_key():
    from omegaconf import OmegaConf

    from maskmtl.config import ConfigError, build

    node = OmegaConf.create({"_target_": "maskmtl.scorers.RandomScorer", "seed": -3})
    with pytest.raises(ConfigError, match=r"scorer .*scorer.seed must be an integer >= 0, got -3"):
        build(node, "scorer")
    node = OmegaConf.create({"_target_": "maskmtl.scorers.RandomScorer", "weighting": "mine"})
    with pytest.raises(ConfigError, match="scorer.weighting"):
        build(node, "scorer")


@pytest.mark.parametrize("scorer", [s for s in SCORERS if s != "random"])
@pytest.mark.parametrize("kind", ["mlp", "conv", "embedding"])
def test_scores_with_terms_equal_drop_scores_exactly(kind, scorer):
    """With diagnostics on, the mask update ranks by drop_scores_and_terms' scores: bit for bit
    drop_scores', and the terms add up to them."""
    model, masks = setup(kind, n_groups=2)
    grads = estimate_gradients(model, masks, loss_fn, batches_for(type(model)))
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    s = SCORERS[scorer]
    plain = s.drop_scores(grads, params, masks.as_dict())
    scores, (a, i) = s.drop_scores_and_terms(grads, params, masks.as_dict())
    for n in masks.names:
        assert torch.equal(plain[n], scores[n]), n
        torch.testing.assert_close(scores[n], a[n] if i is None else a[n] + i[n])


# ---- MaskedAdamW(impl="compiled"): the torch.compile'd update against the reference ---------------
# The compiled update contracts multiply-adds differently, so in-mask values equal the reference
# only up to float rounding (assert_close); entries outside the mask are compared bit for bit.

def _impl_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.register_parameter("unused", torch.nn.Parameter(torch.randn(4)))  # never gets a grad
    g = torch.Generator().manual_seed(seed)
    masks = MaskSet({"0.weight": torch.rand(3, 5, 6, generator=g) < 0.6, "2.weight": torch.rand(3, 3, 5, generator=g) < 0.6},
                    TASKS)
    return model, masks


def _impl_loss(model, step):
    g = torch.Generator().manual_seed(50 + step)
    return (model(torch.randn(8, 6, generator=g)) - torch.randn(8, 3, generator=g)).square().mean()


def _moments(opt, model):
    return {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"].clone())
            for n, p in model.named_parameters() if p in opt.state}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_compiled_masked_adamw_matches_reference(wd):
    model, masks = _impl_setup()
    twin, twin_masks = copy.deepcopy(model), copy.deepcopy(masks)
    ref = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=wd)
    new = MaskedAdamW(twin.named_parameters(), twin_masks, lr=1e-2, weight_decay=wd, impl="compiled")
    groups = [None, None, 0, 1, 2, 0, "swap", 1, 2, 0, None, 1]
    for step, group in enumerate(groups):
        if group == "swap":  # a mask change in the middle: group 1's masks move
            swapped = {n: m.clone() for n, m in masks.items()}
            for m in swapped.values():
                m[1] = m[1].flip(-1)
            masks.set_masks(swapped), twin_masks.set_masks(swapped)
            continue
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        st = _moments(new, twin)
        for m, opt in ((model, ref), (twin, new)):
            opt.zero_grad(set_to_none=True)
            forward = m if group is None else MaskedModel(m, masks if m is model else twin_masks).forward_group
            (_impl_loss(m, step) if group is None else _impl_loss(lambda x: forward(group, x), step)).backward()
            opt.step(group=group)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
            if p in ref.state:
                for a, b in zip(_moments(ref, model)[n], _moments(new, twin)[n]):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
            if q.grad is None:  # a parameter without a gradient is not stepped
                assert torch.equal(q.detach(), before[n]) and n not in _moments(new, twin)
            elif group is not None and n in masks.names:
                off = ~twin_masks[n][group]
                assert torch.equal(q.detach()[off], before[n][off]), f"{n}: masked-out value moved"
                if n in st:
                    assert torch.equal(new.state[q]["exp_avg"][off], st[n][0][off])
                    assert torch.equal(new.state[q]["exp_avg_sq"][off], st[n][1][off])


def test_compiled_masked_adamw_with_full_masks_matches_torch_adamw():
    model, _ = _impl_setup()
    masks = MaskSet({n: torch.ones(3, *p.shape, dtype=torch.bool) for n, p in model.named_parameters()
                     if n.endswith("weight")}, TASKS)
    ref = copy.deepcopy(model)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05, impl="compiled")
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n != "unused"], lr=1e-2, betas=(0.8, 0.95),
                                weight_decay=0.05)
    for step in range(5):
        opt.zero_grad(), ref_opt.zero_grad()
        _impl_loss(MaskedModel(model, masks).bind(step % 3), step).backward()
        _impl_loss(ref, step).backward()
        opt.step(group=step % 3)
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("resume_impl", ["compiled", "reference"])
def test_compiled_masked_adamw_state_dict_round_trip(resume_impl, tmp_path):
    model, masks = _impl_setup()
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, impl="compiled")
    for step in range(4):
        opt.zero_grad()
        _impl_loss(MaskedModel(model, masks).bind(step % 3), step).backward()
        opt.step(group=step % 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    resumed, _ = _impl_setup(seed=1)
    ck = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(ck["model"])
    opt2 = MaskedAdamW(resumed.named_parameters(), masks, lr=1e-2, impl=resume_impl)
    opt2.load_state_dict(ck["opt"])
    assert {n: tuple(x.tolist() for x in v) for n, v in _moments(opt2, resumed).items()} == \
           {n: tuple(x.tolist() for x in v) for n, v in _moments(opt, model).items()}
    for m, o in ((model, opt), (resumed, opt2)):
        o.zero_grad()
        _impl_loss(MaskedModel(m, masks).bind(1), 9).backward()
        o.step(group=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        if resume_impl == "compiled":
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_masked_adamw_rejects_an_unknown_impl():
    model, masks = _impl_setup()
    with pytest.raises(ValueError, match="impl must be one of"):
        MaskedAdamW(model.named_parameters(), masks, impl="fused")


def test_compiled_masked_adamw_eager_fallback_matches(monkeypatch):
    """Where torch.compile is unavailable the same update runs eagerly: still the masked AdamW."""
    from maskmtl import apply

    model, masks = _impl_setup()
    twin = copy.deepcopy(model)
    ref = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=0.1)
    monkeypatch.setitem(apply._COMPILED, "update", apply._adamw_update)
    eager = MaskedAdamW(twin.named_parameters(), masks, lr=1e-2, weight_decay=0.1, impl="compiled")
    for step, group in enumerate([None, 0, 1, 2]):
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        for m, opt in ((model, ref), (twin, eager)):
            opt.zero_grad(set_to_none=True)
            _impl_loss(m if group is None else MaskedModel(m, masks).bind(group), step).backward()
            opt.step(group=group)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            if group is not None and n in masks.names:
                off = ~masks[n][group]
                assert torch.equal(q.detach()[off], before[n][off])


def test_train_optimizer_impl_key():
    from omegaconf import OmegaConf

    from maskmtl.config import ConfigError, check_keys
    from recipes.common import train_keys
    from recipes.loop import TrainSpec

    base = dict(steps=1, batch_size=1, lr=1e-3, betas=[0.9, 0.999], weight_decay=0.0, task_sampling="round_robin",
                log_every=1, eval_every=0, checkpoint_every=0)
    assert TrainSpec.from_config(OmegaConf.create(base)).optimizer_impl == "reference"
    cfg = OmegaConf.create({"train": base | {"optimizer_impl": "compiled"}})
    check_keys(cfg, train_keys())
    assert TrainSpec.from_config(cfg.train).optimizer_impl == "compiled"
    with pytest.raises(ConfigError, match="optimizer_impl"):
        check_keys(OmegaConf.create({"train": base | {"optimizer_impl": "fused"}}), train_keys())
