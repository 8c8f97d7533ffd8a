"""The gating network on synthetic offline data: it learns a separable problem, held-out
accuracy is over whole unseen episodes, windows start where configured, and its state resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.g_harmodt.gate import Gate, GateData, GateNet, accuracy_report
from recipes.metaworld.storage import OfflineDataset, TaskData

S, A = 6, 2


def dataset(n_tasks: int = 4, episodes: int = 6, length: int = 30, seed: int = 0, sep: float = 3.0) -> OfflineDataset:
    """Task k's states scatter around its own centre (``sep`` apart): separable from one transition.
    Each episode's states also carry the step index in dim 0, to check window positions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_tasks, S)) * sep
    data = {}
    for k in range(n_tasks):
        eps = []
        for _ in range(episodes):
            obs = centres[k] + rng.normal(size=(length, S))
            obs[:, 0] = np.arange(length)  # step index
            eps.append({"observations": obs, "actions": rng.uniform(-1, 1, (length, A)), "rewards": rng.random(length)})
        data[f"task{k}"] = TaskData.from_episodes(f"task{k}", eps)
    return OfflineDataset(list(data), data)


def test_gate_net_shape():
    net = GateNet(in_dim=5 * (S + A + 1), n_out=3)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(45, 128), (128, 128), (128, 3)]
    assert net(torch.zeros(7, 45)).shape == (7, 3)


def test_gate_learns_a_separable_problem_and_generalises_to_heldout_episodes():
    data = GateData(dataset(), labels=[0, 1, 1, 0], gn=3, max_start=None, heldout_episodes=2, seed=0)
    gate = Gate(data, lr=3e-3, batch_size=64, seed=0)
    before = gate.heldout_accuracy()["overall"]
    losses = [gate.step() for _ in range(300)]
    acc = gate.heldout_accuracy()
    assert acc["overall"] > 0.97 and before < 0.9
    assert all(v > 0.95 for v in acc["per_label"].values())
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:20])


def test_windows_start_in_the_probe_and_heldout_episodes_never_train():
    d = dataset()
    data = GateData(d, labels=[0, 1, 2, 3], gn=3, max_start=4, heldout_episodes=2, seed=1)
    held = data.heldout()
    assert all(len(v) == 2 for v in held.values())
    rng = np.random.default_rng(0)
    x, y = data.sample(4000, rng)
    steps = x.reshape(len(x), 3, S + A + 1)[:, :, 0] * data.stats.s_std[0] + data.stats.s_mean[0]  # step index back
    assert np.allclose(steps[:, 1:] - steps[:, :-1], 1.0, atol=1e-3)  # consecutive transitions
    assert np.round(steps[:, 0]).min() == 0 and np.round(steps[:, 0]).max() == 4  # starts 0..max_start
    assert sorted(np.unique(y).tolist()) == [0, 1, 2, 3]
    # no training window comes from a held-out episode: compare raw states with each held-out episode's
    train_rows = {tuple(np.round(r, 4)) for r in (x.reshape(-1, S + A + 1)[:, :S] * data.stats.s_std + data.stats.s_mean)}
    for k, t in enumerate(d.tasks):
        for e in held[t]:
            ep = d[t].episode(e)["observations"]
            assert not any(tuple(np.round(r, 4)) in train_rows for r in ep[:7])
    hx, hy = data.heldout_set()
    assert len(hx) == 4 * 2 * 5  # tasks × held-out episodes × starts 0..4
    # only the steps a window reaches are kept (7 of 30 per episode); statistics cover every transition
    assert data._obs.shape[0] == 4 * 6 * 7
    every = np.concatenate([d[t].observations for t in d.tasks]).astype(np.float64)
    assert np.allclose(data.stats.s_mean, every.mean(0)) and np.allclose(data.stats.s_std, every.std(0) + 1e-6)
    rewards = np.concatenate([d[t].rewards for t in d.tasks]).astype(np.float64)
    assert np.isclose(data.stats.r_mean, rewards.mean()) and np.isclose(data.stats.r_std, rewards.std() + 1e-6)


def test_gate_state_resumes_exactly():
    data = GateData(dataset(), labels=[0, 1, 2, 3], gn=2, max_start=None, heldout_episodes=1, seed=0)
    a = Gate(data, batch_size=32, seed=5)
    for _ in range(10):
        a.step()
    state = a.state_dict()
    rest_a = [a.step() for _ in range(5)]
    b = Gate(data, batch_size=32, seed=5)
    b.load_state_dict(state)
    assert [b.step() for _ in range(5)] == rest_a
    c = Gate(data, batch_size=32, seed=6)
    assert not all(torch.equal(p, q) for p, q in zip(Gate(data, seed=5).net.parameters(), c.net.parameters()))


def test_bad_gate_data_is_refused():
    with pytest.raises(ValueError, match="heldout_episodes"):
        GateData(dataset(episodes=3), labels=[0, 1, 2, 3], gn=2, max_start=None, heldout_episodes=3, seed=0)
    with pytest.raises(ValueError, match="shorter than"):
        GateData(dataset(length=4), labels=[0, 1, 2, 3], gn=5, max_start=None, heldout_episodes=1, seed=0)


def test_accuracy_report():
    r = accuracy_report([0, 1, 1, 2], [0, 1, 2, 2], 4)
    assert r == {"overall": 0.75, "per_label": {"0": 1.0, "1": 1.0, "2": 0.5, "3": None}, "n": 4}
