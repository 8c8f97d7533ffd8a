"""Batched Meta-World evaluation: real environments, a few steps; the (tasks × envs) grid with
per-task masks through vmap gives the same per-episode results as batch-1 sequential play."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld")

from maskmtl import MaskSet, RandomInitializer, select_targets  # noqa: E402
from recipes.harmodt.evaluate import GridPolicy, run_grid  # noqa: E402
from recipes.harmodt.model import PromptDT  # noqa: E402
from recipes.metaworld.generate import make_env  # noqa: E402

TASKS = ["reach-v3", "button-press-topdown-v3"]
K, KP, STEPS = 4, 3, 12


def setup():
    torch.manual_seed(0)
    model = PromptDT(39, 4, d_model=32, n_layer=2, n_head=4, dropout=0.0).eval()
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    masks = MaskSet(RandomInitializer(0.7).init_masks({t.name: t.shape for t in targets}, len(TASKS),
                                                      torch.Generator().manual_seed(0)), TASKS)
    g = torch.Generator().manual_seed(1)
    prompt = (torch.randn(2, KP, 39, generator=g), torch.randn(2, KP, 4, generator=g).tanh(),
              torch.rand(2, KP, 1, generator=g), torch.arange(KP).repeat(2, 1), torch.ones(2, KP, dtype=torch.bool))
    return model, masks, prompt


def play(policy, task_rows, episodes, stop_on_success=False):
    envs = [[make_env(TASKS[i], 0) for _ in episodes] for i in task_rows]
    return run_grid(policy, envs, [TASKS[i] for i in task_rows], task_rows, episodes, seed=3,
                    state_mean=np.zeros((len(task_rows), 39)), state_std=np.ones((len(task_rows), 39)),
                    rtg_target=np.full(len(task_rows), 4000.0), reward_scale=1000.0, context=K,
                    max_steps=STEPS, stop_on_success=stop_on_success)


def test_batched_grid_equals_sequential_play():
    model, masks, prompt = setup()
    batched = play(GridPolicy(model, [0, 1], masks, prompt), [0, 1], [0, 1])
    assert batched.env_steps == 2 * 2 * STEPS and len(batched.episodes) == 4
    for e in batched.episodes:
        i = TASKS.index(e.task)
        seq = play(GridPolicy(model, [i], masks, tuple(p[i:i + 1] for p in prompt)), [i], [e.episode])
        (s,) = seq.episodes
        assert (s.seed, s.success, s.steps) == (e.seed, e.success, e.steps)
        assert s.ret == pytest.approx(e.ret, rel=1e-5)
    # two episodes of one task get different goals
    assert len({e.seed for e in batched.episodes}) == 4


def test_each_env_acts_with_its_own_task_mask():
    model, masks, prompt = setup()
    states = torch.randn(2, 1, K, 39)
    args = (states, torch.zeros(2, 1, K, 4), torch.ones(2, 1, K, 1), torch.arange(K).repeat(2, 1, 1),
            torch.ones(2, 1, K, dtype=torch.bool))
    grid = GridPolicy(model, [0, 1], masks, prompt)(*args)
    swapped = GridPolicy(model, [1, 0], masks, prompt)(*args)  # same inputs, masks swapped between rows
    assert not torch.allclose(grid, swapped)
    dense = GridPolicy(model, [0, 1], None, prompt)(*args)
    assert not torch.allclose(grid, dense)


@pytest.mark.parametrize("impl", ["cached", "cached_loop"])
@pytest.mark.parametrize("use_prompt,task_ids", [(True, False), (False, True), (True, True)])
def test_cached_policies_equal_the_reference(impl, use_prompt, task_ids):
    """Every eval.policy_impl computes the reference's actions (up to float rounding), masked and
    dense, with a padded window."""
    torch.manual_seed(0)
    model = PromptDT(39, 4, d_model=32, n_layer=2, n_head=4, dropout=0.0, use_prompt=use_prompt,
                     n_tasks=2 if task_ids else 0).eval()
    _, _, prompt = setup()
    prompt = prompt if use_prompt else None
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    masks = MaskSet(RandomInitializer(0.7).init_masks({t.name: t.shape for t in targets}, len(TASKS),
                                                      torch.Generator().manual_seed(0)), TASKS)
    mask = torch.ones(2, 3, K, dtype=torch.bool)
    mask[:, 0, :2] = False
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 3, K, 39, generator=g), torch.randn(2, 3, K, 4, generator=g),
            torch.randn(2, 3, K, 1, generator=g), torch.arange(K).repeat(2, 3, 1), mask)
    for m in (masks, None):
        ref = GridPolicy(model, [0, 1], m, prompt, task_ids=task_ids)(*args)
        out = GridPolicy(model, [0, 1], m, prompt, task_ids=task_ids, impl=impl)(*args)
        assert out.shape == ref.shape == (2, 3, 4)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    swapped = GridPolicy(model, [1, 0], masks, prompt, task_ids=task_ids, impl=impl)(*args)
    assert not torch.allclose(swapped, ref, atol=1e-4)  # rows still act with their own masks and prompts


@pytest.mark.parametrize("impl", ["cached", "cached_loop"])
def test_cached_policy_plays_the_reference_episodes(impl):
    """On real environments, the cached policies play the reference's episodes: the same actions at
    every step (to 1e-5), success, steps and returns."""
    model, masks, prompt = setup()
    seen = {}

    def played(name, policy):
        acts = []

        def record(t, h):
            acts.append(h.actions[:, :, t].copy())
        envs = [[make_env(TASKS[i], 0) for _ in range(2)] for i in range(2)]
        rep = run_grid(policy, envs, TASKS, [0, 1], [0, 1], seed=3, state_mean=np.zeros((2, 39)),
                       state_std=np.ones((2, 39)), rtg_target=np.full(2, 4000.0), reward_scale=1000.0, context=K,
                       max_steps=STEPS, stop_on_success=False, on_step=record)
        seen[name] = (rep, np.stack(acts))

    played("reference", GridPolicy(model, [0, 1], masks, prompt))
    played(impl, GridPolicy(model, [0, 1], masks, prompt, impl=impl))
    (ref, ref_acts), (out, out_acts) = seen["reference"], seen[impl]
    np.testing.assert_allclose(out_acts, ref_acts, atol=1e-5, rtol=0)
    assert np.abs(ref_acts).max() > 0.01  # the policy does act
    for a, b in zip(ref.episodes, out.episodes):
        assert (a.task, a.episode, a.seed, a.success, a.steps) == (b.task, b.episode, b.seed, b.success, b.steps)
        assert b.ret == pytest.approx(a.ret, rel=1e-5)


def test_unknown_policy_impl_is_refused():
    model, masks, prompt = setup()
    with pytest.raises(ValueError, match="eval.policy_impl"):
        GridPolicy(model, [0, 1], masks, prompt, impl="fast")
