"""Task-agnostic evaluation on fake environments: the routed policy equals the per-task grid policy
when routed to each task's own mask and prompt, and the router switches every env exactly after the
probe, to the gate's label, with the label's prompt and return target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskmtl import MaskSet, RandomInitializer, select_targets
from recipes.g_harmodt.evaluate import AgnosticRouter, RoutedPolicy, Routing
from recipes.g_harmodt.gate import TransitionStats
from recipes.harmodt.evaluate import GridPolicy, run_grid
from recipes.harmodt.model import PromptDT

TASKS = ["a", "b", "c"]
T2G = [0, 1, 0]
K, KP, OBS = 4, 3, 39


class FakeEnv:
    """Deterministic toy env: obs drift with the action; reward = step index + task offset."""

    def __init__(self, task: int, success_at: int | None = None):
        self.task, self.success_at = task, success_at

    def seed(self, s):
        self.rng = np.random.default_rng(s)

    def reset(self):
        self.t = 0
        self.obs = self.rng.normal(size=OBS) + self.task
        return self.obs.copy(), {}

    def step(self, action):
        self.t += 1
        self.obs = self.obs + 0.1 * np.resize(action, OBS)
        return self.obs.copy(), float(self.t + self.task), False, False, {"success": self.t == self.success_at}


def setup():
    torch.manual_seed(0)
    model = PromptDT(OBS, 4, d_model=32, n_layer=2, n_head=4, dropout=0.0).eval()
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    init = RandomInitializer(0.6).init_masks({t.name: t.shape for t in targets}, 2, torch.Generator().manual_seed(0))
    masks = MaskSet(init, TASKS, task_to_group=T2G)
    g = torch.Generator().manual_seed(1)
    prompt = (torch.randn(3, KP, OBS, generator=g), torch.randn(3, KP, 4, generator=g).tanh(),
              torch.rand(3, KP, 1, generator=g), torch.arange(KP).repeat(3, 1), torch.ones(3, KP, dtype=torch.bool))
    return model, masks, prompt


def grid_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, n, K, OBS, generator=g), torch.randn(3, n, K, 4, generator=g), torch.rand(3, n, K, 1, generator=g),
            torch.arange(K).repeat(3, n, 1), torch.ones(3, n, K, dtype=torch.bool))


def test_routed_policy_equals_grid_policy_on_own_masks_and_prompts():
    model, masks, prompt = setup()
    args = grid_inputs(2)
    want = GridPolicy(model, [0, 1, 2], masks, prompt)(*args)
    policy = RoutedPolicy(model, [None, masks.group(0), masks.group(1)], prompt, False, (3, 2))
    policy.route[:] = np.array([[1 + g] * 2 for g in T2G])
    policy.prompt_route[:] = np.array([[i] * 2 for i in range(3)])
    assert torch.allclose(policy(*args), want, atol=1e-5)
    # row 0 (dense θ) is the plain model; mixing rows in one call changes only the rerouted env
    policy.route[1, 0] = 0
    mixed = policy(*args)
    dense = GridPolicy(model, [0, 1, 2], None, prompt)(*args)
    assert torch.allclose(mixed[1, 0], dense[1, 0], atol=1e-5) and not torch.allclose(mixed[1, 0], want[1, 0])
    assert torch.allclose(mixed[[0, 2]], want[[0, 2]], atol=1e-5) and torch.allclose(mixed[1, 1], want[1, 1], atol=1e-5)


class FakeGate:
    """Predicts fixed labels; records the features it was shown."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)
        self.seen = []
        self.data = type("D", (), {"stats": TransitionStats(np.zeros(OBS), np.ones(OBS), np.zeros(4), np.ones(4), 0.0, 1.0)})()

    def predict(self, features):
        self.seen.append(features.copy())
        return self.labels[: len(features)]


def play(gate, probe, gn, blind="random", success_at=None, n=2, steps=9):
    model, masks, prompt = setup()
    prompts = tuple(torch.cat([p, torch.zeros_like(p[:1])]) for p in prompt)  # + empty row
    policy = RoutedPolicy(model, [None, masks.group(0), masks.group(1)], prompts, False, (3, n))
    # labels are tasks here ("+gating"): label k -> group T2G[k], member k, its own return target
    routing = Routing(group=T2G, members=[[0], [1], [2]], rtg=np.array([100.0, 200.0, 300.0]), pooled_rtg=50.0)
    router = AgnosticRouter(policy, gate, routing, probe_steps=probe, gn=gn, n_tasks=3, blind=blind, seed=4,
                            task_index=[0, 1, 2], episode_ids=list(range(n)))
    trace = []

    def traced(*args):
        trace.append((policy.route.copy(), policy.prompt_route.copy(), args[2][:, :, -1, 0].numpy().copy()))
        return policy(*args)

    envs = [[FakeEnv(i, success_at if i == 0 else None) for _ in range(n)] for i in range(3)]
    mean, std = np.full((3, OBS), 0.5), np.full((3, OBS), 2.0)
    rep = run_grid(traced, envs, TASKS, [0, 1, 2], list(range(n)), seed=0, state_mean=mean, state_std=std,
                   rtg_target=np.full(3, 50.0), reward_scale=10.0, context=K, max_steps=steps, stop_on_success=True,
                   act_dim=4, on_step=router)
    return router, trace, rep


def test_router_switches_after_the_probe_to_the_label():
    gate = FakeGate([2, 2, 0, 1, 1, 0])  # env order: (task 0: ep 0, 1), (task 1: …), (task 2: …)
    router, trace, _ = play(gate, probe=4, gn=3)
    labels = np.array([[2, 2], [0, 1], [1, 0]])
    assert (router.predicted == labels).all()
    blind = trace[0][1]
    for t, (route, prompt_route, rtg_now) in enumerate(trace):
        if t < 4:  # probe: shared parameters, blind prompt, pooled target counting down
            assert (route == 0).all() and (prompt_route == blind).all()
            assert np.allclose(rtg_now[0, 0], (50.0 - sum(range(1, t + 1))) / 10.0)
        else:  # routed: the label's group row, its prompt, the label's target minus rewards so far
            assert (route == 1 + np.array(T2G)[labels]).all() and (prompt_route == labels).all()
            assert np.allclose(rtg_now[0, 0], (300.0 - sum(range(1, t + 1))) / 10.0)
    # the gate read the probe's last gn raw transitions (s, a, r) of every env
    (feats,) = gate.seen
    x = feats.reshape(6, 3, OBS + 4 + 1)
    assert np.allclose(x[0, :, -1], [2.0, 3.0, 4.0])  # task 0's rewards at steps 1..3 (reward = t)
    assert np.allclose(x[2, :, -1], [3.0, 4.0, 5.0])  # task 1: reward = t + 1


def test_blind_prompt_is_random_or_empty_and_no_gate_never_routes():
    router, trace, _ = play(None, probe=4, gn=3)
    assert (router.predicted == -1).all() and all((r == 0).all() for r, _, _ in trace)
    assert all(((p >= 0) & (p < 3)).all() for _, p, _ in trace)
    router, trace, _ = play(None, probe=4, gn=3, blind="empty")
    assert all((p == 3).all() for _, p, _ in trace)


def test_envs_done_before_the_probe_ends_get_no_label():
    gate = FakeGate([1, 1, 1, 1])
    router, _, rep = play(gate, probe=4, gn=2, success_at=2)
    assert (router.predicted[0] == -1).all() and (router.predicted[1:] == 1).all()
    assert all(e.success for e in rep.episodes if e.task == "a")


def test_cached_routed_policy_equals_the_reference():
    """eval.policy_impl=cached_loop in the task-agnostic evaluator: prompts encoded per (parameter
    row, prompt row) on first use, the last state only; the reference's actions under any routing."""
    model, masks, prompt = setup()
    prompts = tuple(torch.cat([p, torch.zeros_like(p[:1])]) for p in prompt)  # + the empty prompt row
    args = grid_inputs(2)
    ref = RoutedPolicy(model, [None, masks.group(0), masks.group(1)], prompts, False, (3, 2))
    out = RoutedPolicy(model, [None, masks.group(0), masks.group(1)], prompts, False, (3, 2), impl="cached_loop")
    for route, prompt_route in [(np.zeros((3, 2)), np.full((3, 2), 3)),                   # probe: dense, empty prompt
                                (np.array([[1, 2], [2, 0], [1, 1]]), np.array([[0, 1], [2, 3], [1, 0]]))]:
        for p in (ref, out):
            p.route[:], p.prompt_route[:] = route, prompt_route
        torch.testing.assert_close(out(*args), ref(*args), atol=1e-5, rtol=0)
    assert len(out._prefix) == 5  # the (parameter key, prompt row) pairs seen, each encoded once
    with pytest.raises(ValueError, match="eval.policy_impl"):
        RoutedPolicy(model, [None], prompts, False, (3, 2), impl="fast")
