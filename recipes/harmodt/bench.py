"""``python tools/bench.py eval``: env-steps/s of the batched evaluator vs a sequential batch-1
evaluator and vs raw env stepping with a free (zero-cost) policy, all in one process."""

from __future__ import annotations

import numpy as np
import torch

from maskmtl import ERKInitializer, MaskSet, select_targets
from recipes.harmodt.evaluate import GridPolicy, run_grid
from recipes.harmodt.model import PromptDT
from recipes.metaworld.generate import make_env
from recipes.metaworld.tasksets import taskset


def eval(n_tasks: int = 10, parallel: int = 5, steps: int = 40, d_model: int = 128, n_layer: int = 6,
         context: int = 20, prompt_length: int = 5, threads: int | None = None, seed: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    tasks = taskset("MT50")[:n_tasks]
    torch.manual_seed(seed)
    model = PromptDT(39, 4, d_model=d_model, n_layer=n_layer).eval()
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    masks = MaskSet(ERKInitializer(0.8).init_masks({t.name: t.shape for t in targets}, n_tasks,
                                                   torch.Generator().manual_seed(seed)), tasks)
    g = torch.Generator().manual_seed(seed)
    prompt = (torch.randn(n_tasks, prompt_length, 39, generator=g), torch.randn(n_tasks, prompt_length, 4, generator=g),
              torch.rand(n_tasks, prompt_length, 1, generator=g), torch.arange(prompt_length).repeat(n_tasks, 1),
              torch.ones(n_tasks, prompt_length, dtype=torch.bool))
    common = dict(seed=seed, reward_scale=1000.0, context=context, max_steps=steps, stop_on_success=False)

    def grid(policy, rows, episodes):
        envs = [[make_env(tasks[i], seed) for _ in episodes] for i in rows]
        return run_grid(policy, envs, [tasks[i] for i in rows], rows, episodes, state_mean=np.zeros((len(rows), 39)),
                        state_std=np.ones((len(rows), 39)), rtg_target=np.full(len(rows), 4000.0), **common)

    rows, episodes = list(range(n_tasks)), list(range(parallel))
    batched = grid(GridPolicy(model, rows, masks, prompt), rows, episodes)
    free = grid(lambda s, *a: torch.zeros(s.shape[0], s.shape[1], 4), rows, episodes)
    seq_policy, seq_sim, seq_steps = 0.0, 0.0, 0
    for i in rows:  # batch-1: one policy call per env step, each task with its own mask
        pol = GridPolicy(model, [i], masks, tuple(p[i:i + 1] for p in prompt))
        for e in episodes:
            r = grid(pol, [i], [e])
            seq_policy, seq_sim, seq_steps = seq_policy + r.policy_s, seq_sim + r.sim_s, seq_steps + r.env_steps
    rate = lambda steps_, secs: steps_ / secs  # noqa: E731
    b_rate = rate(batched.env_steps, batched.policy_s + batched.sim_s)
    s_rate = rate(seq_steps, seq_policy + seq_sim)
    return {
        "tasks": n_tasks, "envs": n_tasks * parallel, "steps_per_episode": steps, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "batched_env_steps_per_s": b_rate,
        "sequential_env_steps_per_s": s_rate,
        "free_policy_env_steps_per_s": rate(free.env_steps, free.policy_s + free.sim_s),
        "speedup_vs_sequential": b_rate / s_rate,
        "batched_policy_share": batched.policy_s / (batched.policy_s + batched.sim_s),
        "sequential_policy_share": seq_policy / (seq_policy + seq_sim),
        "target_speedup_cpu": 1.5,
    }
