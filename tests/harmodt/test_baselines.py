"""The journal's other baselines in the harmodt recipe: MTBC's task-id MLP actor and the
multi-game DT (MGDT). Golden numbers of MGDT's return classes, their loss and the expert tilt; the
models' conditioning (MTBC: each step from its own state and the task; MGDT: the return class of
step t never sees R_t); masks on the MLP actor through the batched evaluation; every method end to
end, and a killed run resumed equal to an uninterrupted one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskmtl import MaskedModel, MaskSet
from recipes.harmodt.baselines import (IQLAgent, MLPActor, MultiGameDT, ReturnSamplingPolicy, awr_weights,
                                       bin_centres, expectile_loss, expert_return_logits, iql_loss, return_bin,
                                       return_bin_loss, td_target)
from recipes.harmodt.evaluate import GridPolicy


# ---------------------------------------------------------------------------------- golden numbers

def test_return_bins_golden():
    # 4 bins of [0, 2]: [0, .5) [.5, 1) [1, 1.5) [1.5, 2]; outside values clamp into the end bins
    rtg = torch.tensor([0.1, 0.6, 1.0, 1.99, 2.5, -0.3])
    assert return_bin(rtg, 4, 2.0).tolist() == [0, 1, 2, 3, 3, 0]
    assert bin_centres(4, 2.0).tolist() == [0.25, 0.75, 1.25, 1.75]


def test_return_bin_loss_golden():
    # two real steps with probabilities (0.1, 0.2, 0.3, 0.4) and targets bins 2 and 0; a padded step
    # (mask False) whose target would cost ln(1/0.4) is left out
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(1, 3, 4)
    rtg = torch.tensor([[[1.2], [0.2], [1.9]]])  # return_max 2 -> bins 2, 0, 3
    mask = torch.tensor([[True, True, False]])
    loss = return_bin_loss(logits, rtg, mask, 2.0)
    assert float(loss) == pytest.approx((-math.log(0.3) - math.log(0.1)) / 2, abs=1e-6)  # 1.7533
    assert float(loss) == pytest.approx(1.753278, abs=1e-5)


def test_expert_tilt_golden():
    # uniform predicted returns, kappa 10, 4 bins: P(bin i | expert) ∝ exp(10 (i + 0.5) / 4)
    p = expert_return_logits(torch.zeros(4), 10.0, 4).softmax(-1)
    assert p.tolist() == pytest.approx([0.000508, 0.006185, 0.075350, 0.917957], abs=1e-6)
    # kappa 0 leaves the model's distribution as it is
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert torch.allclose(expert_return_logits(logits, 0.0, 4).softmax(-1), logits.softmax(-1))


def test_iql_expectile_and_awr_weights_golden():
    # L2_0.7(u) = |0.7 - 1(u < 0)| u^2: u = -2 -> 0.3 * 4, u = 1 -> 0.7, u = 0 -> 0, u = 0.5 -> 0.175
    u = torch.tensor([-2.0, 1.0, 0.0, 0.5])
    assert expectile_loss(u, 0.7).tolist() == pytest.approx([1.2, 0.7, 0.0, 0.175])
    assert expectile_loss(u, 0.5).tolist() == pytest.approx([2.0, 0.5, 0.0, 0.125])  # tau 0.5: half the MSE
    # exp(3 A) clipped at 100: A = 0 -> 1, A = 1 -> e^3, A = -1 -> e^-3, A = 10 -> 100
    w = awr_weights(torch.tensor([0.0, 1.0, -1.0, 10.0]), 3.0, 100.0)
    assert w.tolist() == pytest.approx([1.0, 20.085537, 0.049787, 100.0], rel=1e-5)
    # r + gamma (1 - done) V(s'): 1 + 0.99 * 2, and 0.5 at a terminal
    assert td_target(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 3.0]), 0.99,
                     torch.tensor([False, True])).tolist() == pytest.approx([2.98, 0.5])


def test_iql_loss_golden():
    """One segment of 3 steps, the first padding: V and the actor train on steps 1, 2; Q on the
    transition (1, 2) with r = R_1 - R_2 = 0.5 (times the task's reward multiplier 2 -> 1)."""
    out = {"v": torch.tensor([[9.0, 1.0, 2.0]]), "q_target": torch.tensor([[9.0, 1.5, 1.0]]),
           "q1": torch.tensor([[9.0, 2.0, 9.0]]), "q2": torch.tensor([[9.0, 3.0, 9.0]]),
           "actions": torch.tensor([[[0.0], [1.0], [0.0]]])}
    batch = {"mask": torch.tensor([[False, True, True]]), "returns_to_go": torch.tensor([[[7.0], [1.0], [0.5]]]),
             "actions": torch.zeros(1, 3, 1), "task": torch.tensor([1])}
    loss = iql_loss(out, batch, tau=0.7, beta=1.0, gamma=0.9, max_weight=100.0, reward_mult=torch.tensor([5.0, 2.0]))
    # V: u = (0.5, -1) -> (0.7 * 0.25 + 0.3 * 1) / 2 = 0.2375
    # Q: target 1 + 0.9 * 2 = 2.8; (2 - 2.8)^2 + (3 - 2.8)^2 = 0.68
    # actor: weights exp(0.5), exp(-1) on errors 1, 0 -> exp(0.5) / 2 = 0.824361
    assert float(loss) == pytest.approx(0.2375 + 0.68 + math.exp(0.5) / 2, abs=1e-5)
    assert float(loss) == pytest.approx(1.741861, abs=1e-5)


def test_iql_agent_heads_targets_and_actor():
    torch.manual_seed(0)
    agent = IQLAgent(7, 2, n_tasks=3, width=16, depth=2)
    # the targets are buffers (saved, never trained) equal to the critics at the start
    assert not any(n.startswith(("q1_target", "q2_target")) for n, _ in agent.named_parameters())
    assert torch.equal(agent.state_dict()["q1_target.heads.weight"], agent.q1.heads.weight)
    states, actions, rtg, t, mask = segment()
    task = torch.tensor([0, 1, 2])
    out = agent(states, actions, rtg, t, mask, task=task, output="iql")
    assert torch.equal(agent(states, actions, rtg, t, mask, task=task), out["actions"])
    # each row reads its own task's head
    heads = agent.v.heads(agent.v.trunk(states))  # (B, K, T)
    assert torch.equal(out["v"], heads[torch.arange(3), :, task])
    # the Q and V terms give the actor no gradient, and the targets none at all
    (out["q1"].sum() + out["v"].sum() + out["q_target"].sum()).backward()
    assert all(p.grad is None for p in agent.actor.parameters()) and agent.q1.heads.weight.grad is not None
    # the targets move towards the critics by the rate
    before = agent.q1_target.heads.weight.clone()
    with torch.no_grad():
        agent.q1.heads.weight.add_(1.0)
    agent.update_targets(0.25)
    assert torch.allclose(agent.q1_target.heads.weight, before + 0.25, atol=1e-6)


# ---------------------------------------------------------------------------------- models

def segment(b=3, k=5, s=7, a=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, s, generator=g), torch.rand(b, k, a, generator=g) * 2 - 1,
            torch.rand(b, k, 1, generator=g), torch.arange(k).expand(b, k).clone(), torch.ones(b, k, dtype=torch.bool))


def test_mlp_actor_acts_on_each_state_and_the_task():
    torch.manual_seed(0)
    actor = MLPActor(7, 2, width=16, depth=2, n_tasks=3)
    states, actions, rtg, t, mask = segment()
    task = torch.tensor([0, 1, 2])
    out = actor(states, actions, rtg, t, mask, task=task)
    assert out.shape == (3, 5, 2) and out.abs().max() <= 1
    # step 2 alone gives the same action: nothing but its own state and the task is read
    alone = actor(states[:, 2:3], task=task)
    assert torch.allclose(out[:, 2:3], alone, atol=1e-6)
    # other actions / returns / timesteps change nothing; another task id changes the action
    other = actor(states, -actions, rtg * 5, t.flip(1), mask, task=task)
    assert torch.equal(out, other)
    assert not torch.allclose(out, actor(states, task=torch.tensor([1, 2, 0])))
    with pytest.raises(ValueError, match="pass task"):
        actor(states)


def test_mgdt_return_class_never_sees_the_current_return():
    torch.manual_seed(0)
    model = MultiGameDT(7, 2, d_model=16, n_layer=2, n_head=2, dropout=0.0, max_ep_len=10, return_bins=6,
                        return_max=1.0).eval()
    states, actions, rtg, t, mask = segment()
    act, logits = model(states, actions, rtg, t, mask, output="both")
    assert act.shape == (3, 5, 2) and logits.shape == (3, 5, 6)
    changed = rtg.clone()
    changed[:, 3:] += 0.5  # R_3 and later
    act2, logits2 = model(states, actions, changed, t, mask, output="both")
    assert torch.allclose(logits[:, :4], logits2[:, :4], atol=1e-6)  # return classes of steps <= 3: unchanged
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])         # step 4 sees R_3
    assert torch.allclose(act[:, :3], act2[:, :3], atol=1e-6) and not torch.allclose(act[:, 3], act2[:, 3])
    assert torch.equal(model(states, actions, rtg, t, mask), act)
    with pytest.raises(ValueError, match="neither a prompt nor a task id"):
        model(states, actions, rtg, t, mask, task=torch.zeros(3, dtype=torch.long))


def test_mgdt_loss_is_action_mse_plus_weighted_return_loss():
    """The recipe's MGDT loss: action MSE over the real steps + return_loss_weight × the
    return-class loss; the held-out loss (the default arch's loss) is the action MSE alone."""
    from recipes.harmodt.train import make_loss_fn

    torch.manual_seed(0)
    model = MultiGameDT(7, 2, d_model=16, n_layer=1, n_head=2, dropout=0.0, max_ep_len=10, return_bins=6,
                        return_max=1.0).eval()
    states, actions, rtg, t, mask = segment()
    mask[:, :2] = False  # left padding
    batch = {"states": states, "actions": actions, "returns_to_go": rtg, "timesteps": t, "mask": mask}
    act, logits = model(states, actions, rtg, t, mask, output="both")
    mse = (act - actions).square().mean(-1)[mask].mean()
    ce = return_bin_loss(logits, rtg, mask, 1.0)
    full = make_loss_fn(False, False, "mgdt", return_loss_weight=0.5, return_max=1.0)(model, 0, batch)
    assert torch.allclose(full, mse + 0.5 * ce)
    assert torch.allclose(make_loss_fn(False, False)(model, 0, batch), mse)


def grid(t_rows=2, n=2, k=4, s=7, a=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t_rows, n, k, s, generator=g), torch.rand(t_rows, n, k, a, generator=g) * 2 - 1,
            torch.rand(t_rows, n, k, 1, generator=g), torch.arange(k).expand(t_rows, n, k).clone(),
            torch.ones(t_rows, n, k, dtype=torch.bool))


def test_return_sampling_policy_is_seeded_and_writes_the_history():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = MultiGameDT(7, 2, d_model=16, n_layer=1, n_head=2, dropout=0.0, max_ep_len=10, return_bins=5,
                        return_max=2.0).eval()
    inputs = grid()
    draws = []
    for _ in range(2):
        policy = ReturnSamplingPolicy(model, [0, 1], kappa=1.0, seed=3)
        act = policy(*inputs)
        draws.append(policy.chosen.copy())
    assert act.shape == (2, 2, 2) and np.array_equal(draws[0], draws[1])
    assert set(np.unique(draws[0]).tolist()) <= set(bin_centres(5, 2.0).tolist())
    # the action is the model's with the drawn return as the current return-to-go
    rtg = inputs[2].clone()
    rtg[:, :, -1, 0] = torch.from_numpy(draws[0])
    want = GridPolicy(model, [0, 1])(inputs[0], inputs[1], rtg, inputs[3], inputs[4])
    assert torch.allclose(act, want, atol=1e-6)
    # a huge tilt always draws the top bin; on_step writes it into the played history
    policy = ReturnSamplingPolicy(model, [0, 1], kappa=1e4, seed=0)
    policy(*inputs)
    assert np.allclose(policy.chosen, 1.8)
    history = SimpleNamespace(rtg=np.zeros((2, 2, 6, 1), np.float32))
    policy.on_step(3, history)
    assert np.allclose(history.rtg[:, :, 3, 0], 1.8) and np.allclose(history.rtg[:, :, 4], 0)


def test_masked_mlp_actor_on_the_grid_equals_each_tasks_masked_forward():
    """HarmoDT-style per-task masks on MTBC's actor: the batched (vmap) evaluation of every task
    under its mask equals the actor's forward with that task's masked weights."""
    torch.manual_seed(0)
    actor = MLPActor(7, 2, width=16, depth=2, n_tasks=2).eval()
    g = torch.Generator().manual_seed(5)
    names = [n for n, _ in actor.named_parameters() if n.endswith("weight")]
    masks = MaskSet({n: torch.rand(2, *dict(actor.named_parameters())[n].shape, generator=g) < 0.6 for n in names},
                    ["a", "b"], [0, 1])
    inputs = grid()
    out = GridPolicy(actor, [0, 1], masks, task_ids=True)(*inputs)
    masked = MaskedModel(actor, masks)
    for i in range(2):
        want = masked.bind(i)(inputs[0][i], task=torch.full((2,), i))[:, -1]
        assert torch.allclose(out[i], want, atol=1e-6)
    dense = GridPolicy(actor, [0, 1], None, task_ids=True)(*inputs)
    assert not torch.allclose(out, dense)


# ---------------------------------------------------------------------------------- end to end

pytest.importorskip("metaworld")

from maskmtl import read_masks_file  # noqa: E402
from test_recipes import killed_and_resumed, smoke_sweep  # noqa: E402

BASELINES = ["mtbc", "mtbc_harmodt_f", "mgdt", "mgdt_harmodt_f", "mtiql", "mtiql_harmodt_f"]
ARCH = {"mtbc": "mlp", "mgdt": "mgdt", "mtiql": "iql"}


@pytest.mark.slow
def test_every_baseline_smoke(tmp_path):
    for d, r in smoke_sweep(tmp_path, BASELINES):
        assert all(abs(x - (1.0 if r["method"] in ARCH else 0.8)) < 0.01 for x in r["density"])
        assert r["config"]["model"]["arch"] == ARCH[r["method"].split("_")[0]]
        if r["method"].startswith("mtiql"):  # the masks cover the actor only
            masks = read_masks_file(d / "masks.safetensors")[0]
            assert masks and all(n.startswith("actor.") for n in masks)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtbc_harmodt_f", "mgdt", "mtiql_harmodt_f"])
def test_baseline_kill_and_resume_equals_uninterrupted(tmp_path, method):
    common = ["recipe=harmodt", "debug=smoke", f"method={method}", "train.steps=16", "train.checkpoint_every=4",
              "masking.update_every=3", "train.eval_every=8", "train.task_sampling=uniform"]
    ra, rb = killed_and_resumed(common, tmp_path, 11)
    assert rb["resumed_from"] == 8
    assert ra["per_task"] == rb["per_task"] and ra["episodes"] == rb["episodes"] and ra["best"] == rb["best"]
    assert ra["density"] == rb["density"]
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True)["model"] for x in "ab")
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
