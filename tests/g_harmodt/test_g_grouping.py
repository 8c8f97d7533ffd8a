"""G-HarmoDT stages 2-3 on synthetic gradients: grouping recovers planted task clusters, group
masks have exactly the configured density, and group-wise training and updates keep their
invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskmtl import (ConstantScheduler, FisherScorer, KNNGrouper, MaskedAdamW, MaskedModel, MaskSet, MaskUpdater,
                     group_tasks)
from maskmtl.groupers import canonical_groups

PLANTED = [0, 1, 2, 0, 1, 2, 0, 1]  # 8 tasks in 3 planted clusters, interleaved
IN, OUT = 12, 6


def setup(seed: int = 0):
    """A 2-layer linear model and tasks whose targets come from one of 3 cluster maps plus a little
    per-task noise: tasks of a cluster pull the weights the same way, clusters pull differently."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, 16, bias=False), nn.Linear(16, OUT, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    cluster_maps = [torch.randn(IN, OUT, generator=g) for _ in range(3)]
    task_maps = [cluster_maps[c] + 0.05 * torch.randn(IN, OUT, generator=g) for c in PLANTED]
    x = torch.randn(64, IN, generator=g)
    tasks = [f"t{i}" for i in range(len(PLANTED))]
    masks = MaskSet({n: torch.ones((len(tasks), *p.shape), dtype=torch.bool) for n, p in model.named_parameters()},
                    tasks)

    def loss_fn(forward, task, batch):
        return (forward(batch) - batch @ task_maps[task]).square().mean()

    def batches(task):
        return [x[:32], x[32:]]

    return model, masks, loss_fn, batches


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # knn_graph: clusters are far apart
@pytest.mark.parametrize("algorithm", KNNGrouper.ALGORITHMS)
def test_grouping_recovers_planted_clusters(algorithm):
    model, masks, loss_fn, batches = setup()
    g = group_tasks(model, masks, FisherScorer(lam=10), KNNGrouper(3, algorithm, n_neighbors=2), loss_fn, batches,
                    density=0.8, seed=0)
    assert g["task_to_group"] == canonical_groups(PLANTED) == masks.task_to_group
    assert g["task_vectors"].shape == (8, masks.numel())
    assert masks.n_groups == 3


@pytest.mark.parametrize("density", [0.8, 0.5, 0.137])
def test_group_masks_have_exactly_the_configured_density(density):
    model, masks, loss_fn, batches = setup(1)
    group_tasks(model, masks, FisherScorer(lam=10), KNNGrouper(3), loss_fn, batches, density=density, seed=0)
    want = int(round(density * masks.numel()))
    assert masks.counts().tolist() == [want] * 3
    assert all(m.dtype == torch.bool and m.shape[0] == 3 for _, m in masks.items())


def test_group_masks_keep_the_highest_summed_harmony():
    model, masks, loss_fn, batches = setup(2)
    scorer = FisherScorer(lam=10)
    ones = {n: m.clone() for n, m in masks.items()}
    g = group_tasks(model, masks, scorer, KNNGrouper(3), loss_fn, batches, density=0.5, seed=0)
    # recompute: per group, the summed per-task scores; every kept entry outranks every dropped one
    from maskmtl import estimate_gradients

    grads = estimate_gradients(model, MaskSet(ones, masks.tasks), loss_fn, batches)
    params = {n: p.detach() for n, p in model.named_parameters()}
    scores = scorer.drop_scores(grads, params, ones)
    for grp in range(3):
        members = [i for i, x in enumerate(g["task_to_group"]) if x == grp]
        s = torch.cat([scores[n][members].sum(0).flatten() for n in masks.names])
        kept = torch.cat([masks[n][grp].flatten() for n in masks.names])
        assert s[kept].min() >= s[~kept].max()


def test_group_wise_training_and_updates_keep_invariants():
    model, masks, loss_fn, batches = setup(3)
    group_tasks(model, masks, FisherScorer(lam=10), KNNGrouper(3), loss_fn, batches, density=0.6, seed=0)
    t2g = list(masks.task_to_group)
    before_counts = masks.counts().tolist()
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=1e-2)
    masked = MaskedModel(model, masks)
    updater = MaskUpdater(FisherScorer(lam=10), ConstantScheduler(7), every=5)
    x = torch.randn(32, IN, generator=torch.Generator().manual_seed(9))
    for step in range(1, 31):
        task = (step - 1) % masks.n_tasks
        grp = masks.group_of(task)
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        loss_fn(masked.bind(task), task, x).backward()
        opt.step(group=grp)
        for n, p in model.named_parameters():  # the step moved nothing outside its group's mask
            outside = ~masks[n][grp]
            assert torch.equal(p.detach()[outside], snapshot[n][outside])
        if updater.due(step):
            old = {n: m.clone() for n, m in masks.items()}
            metrics = updater.update(step, model, masks, loss_fn, batches, optimizer=opt)
            assert metrics["mask/swapped"] == 2 * 7 * 3
            for grp_j in range(3):
                changed = sum(int((old[n][grp_j] != masks[n][grp_j]).sum()) for n in masks.names)
                dropped = sum(int((old[n][grp_j] & ~masks[n][grp_j]).sum()) for n in masks.names)
                assert changed == 14 and dropped == 7  # exactly α each way, per group
    assert masks.counts().tolist() == before_counts
    assert masks.task_to_group == t2g


def test_more_groups_than_tasks_is_a_config_error():
    from omegaconf import OmegaConf

    from maskmtl.config import ConfigError, Masking

    cfg = OmegaConf.create({
        "targets": {"include": r".*weight", "exclude": []},
        "initializer": {"_target_": "maskmtl.initializers.ERKInitializer", "density": 0.8},
        "scorer": {"_target_": "maskmtl.scorers.FisherScorer"},
        "scheduler": {"_target_": "maskmtl.schedulers.ConstantScheduler", "alpha": 0},
        "grouper": {"_target_": "maskmtl.groupers.KNNGrouper", "n_groups": 5},
        "masking": {"update_every": 10, "grad_batches": 1, "recovery_gradient": "dense",
                    "recovered_state": "reset_dormant"},
        "train": {"steps": 100},
    })
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="n_groups=5 exceeds the number of tasks"):
        Masking(cfg, model, ["a", "b", "c"], torch.Generator().manual_seed(0))
