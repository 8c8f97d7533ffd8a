"""The core path on modules unlike the toys: select targets -> init masks -> masked forward ->
masked AdamW steps -> mask updates with every scorer -> save/load masks.

Modules: per-task heads (task i's loss uses head i only), a BERT-like pooler that no loss reads,
an LSTM, a grouped convolution, and a module whose forward takes keyword-only inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maskmtl import (AgreementScorer, CosineScheduler, FisherScorer, MagnitudeScorer, MaskedAdamW, MaskedModel,
                     MaskSet, MaskUpdater, RandomInitializer, estimate_gradients, load_masks, save_masks, select_targets)

SCORERS = {"agreement": AgreementScorer(), "magnitude": MagnitudeScorer(), "fisher": FisherScorer(),
           "fisher_published": FisherScorer(weighting="published", log_loss=False)}
TASKS = ["t0", "t1", "t2"]


class PerTaskHeads(nn.Module):
    """A shared trunk and one head per task; ``forward(x, task)`` runs only that task's head."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in TASKS)

    def forward(self, x, task):
        return self.heads[task](torch.relu(self.trunk(x)))


class Pooler(nn.Module):
    """BERT-like: returns the sequence output and a pooled output; the losses read only the first."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)
        self.pooler = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))  # (B, L, 6)
        return self.out(h), torch.tanh(self.pooler(h[:, 0]))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.out(h[:, -1])


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)  # weight [6, 2, 3, 3]
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, *, x, mask):
        h = torch.relu(self.proj(x)) * mask.unsqueeze(-1)  # (B, L, 7), padded positions zeroed
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


def _regression(out, task):
    return (out - (task + 1.0)).square().mean()


# kind -> (module class, include, exclude, batch(generator, task), loss(forward, task, batch))
CASES = {
    "per_task_heads": (PerTaskHeads, r".*\.weight", None, lambda g, t: (torch.randn(5, 6, generator=g),),
                       lambda f, t, b: _regression(f(b[0], t), t)),
    "pooler": (Pooler, ["encoder.weight", "out.weight", "pooler.weight"], None,
               lambda g, t: (torch.randn(3, 4, 4, generator=g),), lambda f, t, b: _regression(f(*b)[0], t)),
    "lstm": (Recurrent, ["weight_ih_l0", "weight_hh_l0", "out.weight"], None,
             lambda g, t: (torch.randn(3, 4, 4, generator=g),), lambda f, t, b: _regression(f(*b), t)),
    "grouped_conv": (GroupedConv, r".*weight", ["out.weight"], lambda g, t: (torch.randn(2, 4, 5, 5, generator=g),),
                     lambda f, t, b: _regression(f(*b), t)),
    "keyword_only": (KeywordOnly, r".*", [], lambda g, t: {"x": torch.randn(3, 4, 5, generator=g),
                                                            "mask": (torch.arange(4) < torch.tensor([[4], [2], [3]])).float()},
                     lambda f, t, b: _regression(f(**b), t)),
}
EXPECTED_TARGETS = {
    "per_task_heads": ["trunk.weight", "heads.0.weight", "heads.1.weight", "heads.2.weight"],
    "pooler": ["encoder.weight", "out.weight", "pooler.weight"],
    "lstm": ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.weight"],
    "grouped_conv": ["conv.weight"],
    "keyword_only": ["proj.weight", "proj.bias", "out.weight", "out.bias"],
}


def build(kind, seed=0):
    cls, include, exclude, batch, loss = CASES[kind]
    torch.manual_seed(seed)
    model = cls()
    targets = select_targets(model, include, exclude)
    shapes = {t.name: t.shape for t in targets}
    masks = MaskSet(RandomInitializer(0.5).init_masks(shapes, len(TASKS), torch.Generator().manual_seed(seed)), TASKS)

    def batches(task):
        g = torch.Generator().manual_seed(100 + task)
        return [batch(g, task) for _ in range(2)]

    return model, targets, masks, batch, loss, batches


def call(forward, batch):
    return forward(**batch) if isinstance(batch, dict) else forward(*batch)


@pytest.mark.parametrize("kind", CASES)
def test_targets_and_masked_forward(kind):
    model, targets, masks, batch, loss, _ = build(kind)
    assert [t.name for t in targets] == EXPECTED_TARGETS[kind]
    if kind == "grouped_conv":
        assert targets[0].shape == (6, 2, 3, 3)
    mm = MaskedModel(model, masks)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks.names:
                p.mul_(masks[n][1])
    b = batch(torch.Generator().manual_seed(5), 1)
    if kind == "per_task_heads":
        torch.testing.assert_close(mm(1, b[0], 1), ref(b[0], 1))
    else:
        torch.testing.assert_close(call(mm.bind(1), b), call(ref, b))


@pytest.mark.parametrize("kind", CASES)
def test_masked_steps_leave_entries_outside_the_mask_unchanged(kind):
    model, _, masks, batch, loss, _ = build(kind)
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    moved = {n: torch.zeros_like(masks[n]) for n in masks.names}
    for step in range(6):
        task = step % 3
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        loss(mm.bind(task), task, batch(g, task)).backward()
        opt.step(group=masks.group_of(task))
        for n, p in model.named_parameters():
            if n in masks.names:
                off = ~masks[n][task]
                assert torch.equal(p.detach()[off], before[n][off]), f"{n}: an entry outside task {task}'s mask moved"
                moved[n][task] |= p.detach() != before[n]
    for n in masks.names:
        if kind == "per_task_heads" and n.startswith("heads."):
            k = int(n.split(".")[1])
            # head k moves for task k only (the others never use it: no gradient, no step)
            assert moved[n][k].any() and not moved[n][[t for t in range(3) if t != k]].any(), n
        elif kind == "pooler" and n == "pooler.weight":
            assert not moved[n].any()
        else:
            assert moved[n].any(dim=tuple(range(1, moved[n].dim()))).all(), f"{n}: some task never moved it"


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("kind", CASES)
def test_mask_updates_follow_the_schedule_and_keep_densities(kind, scorer, tmp_path):
    model, _, masks, batch, loss, batches = build(kind)
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2)
    # α_t over 4 steps: α_1 = 2, α_2 = 4, α_3 = 2, α_4 = 0 (no update)
    sched = CosineScheduler(eta_min=0, eta_max=4, total_steps=4)
    upd = MaskUpdater(SCORERS[scorer], sched, every=1)
    counts = masks.counts().clone()
    layer = {n: masks[n].reshape(3, -1).sum(1) for n in masks.names}
    g = torch.Generator().manual_seed(2)
    updates = 0
    for step in range(1, 5):
        task = (step - 1) % 3
        opt.zero_grad(set_to_none=True)
        loss(mm.bind(task), task, batch(g, task)).backward()
        opt.step(group=masks.group_of(task))
        before = {n: m.clone() for n, m in masks.items()}
        if upd.due(step):
            metrics = upd.update(step, model, masks, loss, batches, optimizer=opt)
            updates += 1
            assert metrics["mask/alpha"] == sched.alpha(step) and -1.0 <= metrics["mask/harmony"] <= 1.0
        changed = torch.stack([(masks[n] != before[n]).reshape(3, -1).sum(1) for n in masks.names]).sum(0)
        assert changed.tolist() == [2 * sched.alpha(step)] * 3, f"step {step}"  # per group: α out, α in
        assert torch.equal(masks.counts(), counts), "a group's density changed"
    assert updates == 3 and not upd.due(4)
    if kind == "per_task_heads":
        # group j's active entries on the heads of other tasks (unused by task j) go first: all
        # 8 drops (2 + 4 + 2) come from them, and nothing is recovered there
        for j in range(3):
            others = [f"heads.{k}.weight" for k in range(3) if k != j]
            assert sum(int(masks[n][j].sum()) for n in others) == sum(int(layer[n][j]) for n in others) - 8
            assert int(masks[f"heads.{j}.weight"][j].sum()) >= int(layer[f"heads.{j}.weight"][j])
    if kind == "pooler":
        # no loss reads the pooler: 8 updates' worth of drops (2 + 4 + 2 per group) all come from it
        assert (masks["pooler.weight"].reshape(3, -1).sum(1) == layer["pooler.weight"] - 8).all()
    # save / load, checked against the model
    path = tmp_path / "masks.safetensors"
    save_masks(masks, path)
    _, _, fresh, *_ = build(kind, seed=3)
    load_masks(fresh, path, model=model)
    assert all(torch.equal(fresh[n], masks[n]) for n in masks.names)


def test_per_task_heads_gradients_are_zero_where_unused():
    model, _, masks, _, loss, batches = build("per_task_heads")
    grads = estimate_gradients(model, masks, loss, batches)
    for k in range(3):
        name = f"heads.{k}.weight"
        assert grads.task_unused[name].tolist() == [t != k for t in range(3)]
        for t in range(3):
            if t != k:  # zero gradient: zero agreement, zero Fisher importance
                assert not grads.task_masked[name][t].any() and not grads.dense[name][t].any()
        assert grads.task_masked[name][k].any()
    assert not grads.task_unused["trunk.weight"].any()
    unused = grads.group_unused()
    assert unused["heads.0.weight"].tolist() == [False, True, True] and not unused["trunk.weight"].any()
    fisher = FisherScorer().importance(grads, {}, masks.as_dict())
    assert not fisher["heads.0.weight"][1:].any()


def test_unused_heads_are_dropped_first_and_recovered_last():
    model, _, masks, _, loss, batches = build("per_task_heads")
    before = {n: m.clone() for n, m in masks.items()}
    MaskUpdater(MagnitudeScorer(), CosineScheduler(0, 6, 2), every=1).update(1, model, masks, loss, batches)
    for j in range(3):
        dropped = {n: (before[n][j] & ~masks[n][j]).sum().item() for n in masks.names}
        recovered = {n: (~before[n][j] & masks[n][j]).sum().item() for n in masks.names}
        used = {"trunk.weight", f"heads.{j}.weight"}
        # magnitude importance |θ⊙M| is not zero on unused heads, yet they are dropped first
        assert sum(dropped.values()) == 6 and all(v == 0 for n, v in dropped.items() if n in used)
        assert sum(recovered.values()) == 6 and all(v == 0 for n, v in recovered.items() if n not in used)


def test_grouping_keeps_no_entries_on_heads_a_group_never_uses():
    from maskmtl import group_tasks

    class Fixed:  # a Grouper: tasks 0 and 1 together, task 2 alone
        def group(self, task_vectors, seed):
            assert task_vectors.shape[0] == 3
            return [0, 0, 1]

        def n_groups(self, n_tasks):
            return 2

    model, _, masks, _, loss, batches = build("per_task_heads")
    info = group_tasks(model, masks, MagnitudeScorer(), Fixed(), loss, batches, density=0.5, seed=0)
    t2g = info["task_to_group"]
    assert t2g == [0, 0, 1] and masks.n_groups == 2
    # budget 0.5 · 96 = 48 entries per group, fewer than the entries its tasks use (trunk 48 + heads):
    # a head whose task is in another group keeps nothing, whatever its magnitude
    assert masks.counts().tolist() == [48, 48]
    for k in range(3):
        for j in range(2):
            if t2g[k] != j:
                assert not masks[f"heads.{k}.weight"][j].any(), (k, j)


def test_swap_with_unused_entries_keeps_its_invariants():
    from maskmtl import swap

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        groups, n = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 20, (1,), generator=g))
        masks = {"a": torch.rand(groups, n, generator=g) < 0.5, "b": torch.rand(groups, 3, generator=g) < 0.5}
        unused = {"a": (torch.rand(groups, 1, generator=g) < 0.5).expand(groups, n),
                  "b": (torch.rand(groups, 1, generator=g) < 0.5).expand(groups, 3)}
        flat = torch.cat([masks["a"], masks["b"]], 1)
        idle = torch.cat([unused["a"], unused["b"]], 1)
        limit = int(torch.minimum(flat.sum(1), (~flat).sum(1)).min())
        alpha = int(torch.randint(0, limit + 1, (1,), generator=g))
        scores = {k: torch.randn(v.shape, generator=g).round() for k, v in masks.items()}
        res = swap(masks, scores, scores, alpha, unused=unused)
        new = torch.cat([res.masks["a"], res.masks["b"]], 1)
        dropped = torch.cat([res.dropped["a"], res.dropped["b"]], 1)
        recov = torch.cat([res.recovered["a"], res.recovered["b"]], 1)
        assert torch.equal(new.sum(1), flat.sum(1)) and torch.equal(new, (flat & ~dropped) | recov)
        assert not (dropped & ~flat).any() and not (recov & flat).any()
        for r in range(groups):
            # unused active entries go first; unused inactive ones only when used ones run out
            n_idle_on, n_used_off = int((flat[r] & idle[r]).sum()), int((~flat[r] & ~idle[r]).sum())
            assert int((dropped[r] & idle[r]).sum()) == min(alpha, n_idle_on)
            assert int((recov[r] & ~idle[r]).sum()) == min(alpha, n_used_off)
