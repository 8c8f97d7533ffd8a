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


def _dt_batches(batch: int, context: int, prompt_length: int, seed: int, n: int = 8) -> list[dict]:
    """Synthetic Prompt-DT batches with the real shapes (timing needs shapes, not data)."""
    g = torch.Generator().manual_seed(seed)

    def part(k):
        return {"states": torch.randn(batch, k, 39, generator=g), "actions": torch.rand(batch, k, 4, generator=g) * 2 - 1,
                "returns_to_go": torch.rand(batch, k, 1, generator=g), "timesteps": torch.randint(480, (batch, k), generator=g),
                "mask": torch.ones(batch, k, dtype=torch.bool)}

    out = []
    for _ in range(n):
        b, p = part(context), part(prompt_length)
        b.update({f"prompt_{k}": v for k, v in p.items()}, task=torch.zeros(batch, dtype=torch.long))
        out.append(b)
    return out


DT_TARGETS = (r".*\.weight", r".*(ln|norm|timestep).*")  # as conf/recipe/harmodt.yaml


def masked_step(d_model: int = 128, n_layer: int = 6, batch: int = 8, context: int = 20, prompt_length: int = 5,
                **kw) -> dict:
    """Masked vs dense training step of the Prompt-DT (paper size by default), interleaved."""
    from maskmtl.bench import compare_steps
    from recipes.harmodt.train import make_loss_fn

    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch, "tokens": 3 * (context + prompt_length),
            **compare_steps(lambda: PromptDT(39, 4, d_model=d_model, n_layer=n_layer),
                            _dt_batches(batch, context, prompt_length, kw.get("seed", 0)), make_loss_fn(True, False),
                            include=DT_TARGETS[0], exclude=DT_TARGETS[1], **kw)}


def mask_update(d_model: int = 128, n_layer: int = 6, batch: int = 8, context: int = 20, prompt_length: int = 5,
                n_tasks: int = 50, **kw) -> dict:
    """One full mask update of the Prompt-DT for N tasks (default 50, MT50) vs one training step."""
    from maskmtl.bench import time_mask_update
    from recipes.harmodt.train import make_loss_fn

    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch,
            **time_mask_update(lambda: PromptDT(39, 4, d_model=d_model, n_layer=n_layer),
                               _dt_batches(batch, context, prompt_length, kw.get("seed", 0), 4),
                               make_loss_fn(True, False), include=DT_TARGETS[0], exclude=DT_TARGETS[1],
                               n_tasks=n_tasks, **kw)}


def export(d_model: int = 128, n_layer: int = 6, batch: int = 1, context: int = 20, prompt_length: int = 5,
           granularity: str = "head", **kw) -> dict:
    """Exported per-task Prompt-DT (masked-out heads and MLP units removed) vs the masked full
    model at inference: parameters, file size, latency (``maskmtl.bench.compare_export``)."""
    from maskmtl.bench import compare_export
    from recipes.harmodt.train import forward_kwargs

    torch.manual_seed(kw.get("seed", 0))
    model = PromptDT(39, 4, d_model=d_model, n_layer=n_layer)
    inputs = forward_kwargs(_dt_batches(batch, context, prompt_length, kw.get("seed", 0), 1)[0], True, False)
    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch,
            **compare_export(model, inputs, include=DT_TARGETS[0], exclude=DT_TARGETS[1], granularity=granularity, **kw)}
