"""MaskUpdater(memory="grouped"): one group at a time, with buffers of a few [P] instead of [N, P]
and [G, P]. It must be the same update: the same masks (exactly, on the CPU), optimizer resets,
harmony and diagnostics, over every scorer, both recovery gradients, grouped masks, a target one
task never uses, and consecutive updates with tracked diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maskmtl import (AgreementScorer, ConstantScheduler, ERKInitializer, FisherScorer, MagnitudeScorer, MaskedAdamW,
                     MaskedModel, MaskSet, RandomScorer)
from maskmtl.update import MaskUpdater

N_TASKS = 5


class Net(nn.Module):
    """Two shared layers and one head per task (task i's loss never uses the other heads)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 24), nn.Linear(24, 24)
        self.heads = nn.ModuleList(nn.Linear(24, 1) for _ in range(N_TASKS))

    def forward(self, x, task):
        return self.heads[task](torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).squeeze(-1)


def loss_fn(forward, task, batch):
    x, y = batch
    return (forward(x, task) - y).square().mean() + 0.1  # > 0: Fisher's log-loss form takes it


def setup(task_to_group):
    torch.manual_seed(0)
    model = Net()
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    n_groups = max(task_to_group) + 1
    masks = MaskSet(ERKInitializer(0.6).init_masks(shapes, n_groups, torch.Generator().manual_seed(1)),
                    [f"t{i}" for i in range(N_TASKS)], task_to_group)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2)
    mm = MaskedModel(model, masks)
    w = torch.randn(N_TASKS, 6, generator=torch.Generator().manual_seed(2))
    data = {t: [(x, x @ w[t]) for x in torch.randn(3, 16, 6, generator=torch.Generator().manual_seed(10 + t))]
            for t in range(N_TASKS)}
    for step in range(10):  # some training first, so gradients and moments are not trivial
        t = step % N_TASKS
        opt.zero_grad(set_to_none=True)
        loss_fn(mm.bind(t), t, data[t][0]).backward()
        opt.step(group=masks.group_of(t))
    return model, masks, opt, data


SCORERS = {"fisher": lambda: FisherScorer(), "fisher_rank": lambda: FisherScorer(weighting="rank"),
           "magnitude": lambda: MagnitudeScorer(), "agreement": lambda: AgreementScorer(),
           "random": lambda: RandomScorer(seed=3)}


@pytest.mark.parametrize("grouping", [list(range(N_TASKS)), [0, 1, 0, 2, 1]], ids=["per-task", "grouped"])
@pytest.mark.parametrize("recovery", ["dense", "masked_point"])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_grouped_update_equals_the_full_update(scorer, recovery, grouping):
    runs = {}
    for memory in ("full", "grouped"):
        model, masks, opt, data = setup(grouping)
        upd = MaskUpdater(SCORERS[scorer](), ConstantScheduler(7), every=5, recovery_gradient=recovery, memory=memory)
        upd.track(masks)
        seen, metrics = [], []
        for step in (5, 10):  # two updates: the second reads the tracked drop sets of the first
            metrics.append(upd.update(step, model, masks, loss_fn, lambda t: data[t][1:], optimizer=opt,
                                      progress=seen.append))
        runs[memory] = (masks, opt, metrics, seen, upd)
    (mf, of, full, seen_f, uf), (mg, og, grouped, seen_g, ug) = runs["full"], runs["grouped"]
    assert all(torch.equal(mf[n], mg[n]) for n in mf.names)
    initial = uf.state_dict()["initial"]
    assert sum(int((mf[n] != initial[n]).sum()) for n in mf.names) > 0  # the updates did change the masks
    assert sorted(seen_f) == sorted(seen_g) == sorted(list(range(N_TASKS)) * 2)
    sf, sg = of.state_dict()["state"], og.state_dict()["state"]
    assert all(torch.equal(sf[k][x], sg[k][x]) for k in sf for x in ("exp_avg", "exp_avg_sq"))
    for a, b in zip(full, grouped):
        keys = {k for k in a if not k.startswith("time/")}
        assert keys == {k for k in b if not k.startswith("time/")}
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
    assert "mask/drop_jaccard_groups" in full[0] and "mask/drop_jaccard_consecutive" in full[1]
    assert all(torch.equal(uf.state_dict()["last_dropped"][n], ug.state_dict()["last_dropped"][n]) for n in mf.names)


def test_grouped_update_refuses_structured_masks_and_unknown_modes():
    with pytest.raises(ValueError, match="masking.update_memory must be one of"):
        MaskUpdater(FisherScorer(), ConstantScheduler(1), every=5, memory="low")

    class FakeStructures:
        pass
    with pytest.raises(ValueError, match="element masks only"):
        MaskUpdater(FisherScorer(), ConstantScheduler(1), every=5, memory="grouped", structures=FakeStructures())


def test_a_failed_swap_names_the_group_of_the_full_masks_and_changes_nothing():
    """Group 2 keeps all but 3 entries: α = 5 fails there, after groups 0 and 1 were swapped in the
    working copy; the error names group 2 and the masks stay as they were."""
    from maskmtl.selection import MaskUpdateError
    model, masks, opt, data = setup([0, 1, 0, 2, 1])
    full = {n: m.clone() for n, m in masks.as_dict().items()}
    for n in full:
        full[n][2] = True
    first = masks.names[0]
    full[first][2].view(-1)[:3] = False
    masks.set_masks(full)
    before = copy.deepcopy(masks.as_dict())
    upd = MaskUpdater(FisherScorer(), ConstantScheduler(5), every=5, memory="grouped")
    with pytest.raises(MaskUpdateError, match="group 2: alpha=5 exceeds its active .* or inactive \\(3\\)"):
        upd.update(5, model, masks, loss_fn, lambda t: data[t][1:])
    assert all(torch.equal(before[n], masks[n]) for n in masks.names)
