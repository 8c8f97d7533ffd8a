"""Benchmarks of the harmodt recipe's Prompt-DT (``python tools/bench.py masked-step``,
``mask-update``, ``surgery-step``, ``export``, ``eval``).

``eval``: env-steps/s of the batched evaluator vs a sequential batch-1 evaluator and vs raw env
stepping with a free (zero-cost) policy, all in one process. ``policy_impl=reference,cached,...``
runs every ``eval.policy_impl`` on the same inputs at every step of the batched grid (the first
one's actions are played), and reports each one's evaluator rate (env steps over its policy time
plus the shared simulation time), median over ``repeats`` grids, against the reference's."""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.core import compare_export, compare_steps, time_mask_update
from maskmtl import ERKInitializer, MaskSet, select_targets
from recipes.harmodt.evaluate import GridPolicy, run_grid
from recipes.harmodt.model import PromptDT
from recipes.metaworld.generate import make_env
from recipes.metaworld.tasksets import taskset


def eval(n_tasks: int = 10, parallel: int = 5, steps: int = 40, d_model: int = 128, n_layer: int = 6,
         context: int = 20, prompt_length: int = 5, threads: int | None = None, seed: int = 0,
         device: str = "cpu", policy_impl: str = "reference", repeats: int = 1, sequential: bool = True) -> dict:
    impls = [x.strip() for x in str(policy_impl).split(",") if x.strip()]
    if threads:
        torch.set_num_threads(threads)
    tasks = taskset("MT50")[:n_tasks]
    torch.manual_seed(seed)
    model = PromptDT(39, 4, d_model=d_model, n_layer=n_layer).eval().to(device)
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    masks = MaskSet(ERKInitializer(0.8).init_masks({t.name: t.shape for t in targets}, n_tasks,
                                                   torch.Generator().manual_seed(seed)), tasks).to(device)
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
    policies = {impl: GridPolicy(model, rows, masks, prompt, impl=impl) for impl in impls}
    rate = lambda steps_, secs: steps_ / secs  # noqa: E731
    rates: dict[str, list[float]] = {impl: [] for impl in impls}
    policy_share: dict[str, list[float]] = {impl: [] for impl in impls}
    spent = {impl: 0.0 for impl in impls}

    def paired(*args):
        """Every implementation on the same inputs at every step, in an order rotated per step; the
        first one's actions are played. Pairing per step keeps load drifts out of the ratios."""
        out = None
        k = paired.calls % len(impls)
        paired.calls += 1
        for impl in impls[k:] + impls[:k]:
            t0 = time.perf_counter()
            act = policies[impl](*args)
            spent[impl] += time.perf_counter() - t0
            if impl == impls[0]:
                out = act
        return out
    paired.calls = 0
    for _ in range(max(1, int(repeats))):
        for impl in impls:
            spent[impl] = 0.0
        r = grid(paired, rows, episodes)
        for impl in impls:  # the evaluator's rate had it run this implementation alone
            rates[impl].append(rate(r.env_steps, spent[impl] + r.sim_s))
            policy_share[impl].append(spent[impl] / (spent[impl] + r.sim_s))
    med = {impl: float(np.median(v)) for impl, v in rates.items()}
    free = grid(lambda s, *a: torch.zeros(s.shape[0], s.shape[1], 4), rows, episodes)
    seq_policy, seq_sim, seq_steps = 0.0, 0.0, 0
    for i in rows if sequential else []:  # batch-1: one policy call per env step, each task with its own mask
        pol = GridPolicy(model, [i], masks, tuple(p[i:i + 1] for p in prompt), impl=impls[0])
        for e in episodes:
            r = grid(pol, [i], [e])
            seq_policy, seq_sim, seq_steps = seq_policy + r.policy_s, seq_sim + r.sim_s, seq_steps + r.env_steps
    b_rate = med[impls[0]]
    s_rate = rate(seq_steps, seq_policy + seq_sim) if sequential else float("nan")
    out = {
        "tasks": n_tasks, "envs": n_tasks * parallel, "steps_per_episode": steps, "threads": torch.get_num_threads(),
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "batched_env_steps_per_s": b_rate,
        "sequential_env_steps_per_s": s_rate,
        "free_policy_env_steps_per_s": rate(free.env_steps, free.policy_s + free.sim_s),
        "speedup_vs_sequential": b_rate / s_rate,
        "batched_policy_share": float(np.median(policy_share[impls[0]])),
        "sequential_policy_share": seq_policy / (seq_policy + seq_sim) if sequential else float("nan"),
        "target_speedup": 10.0 if torch.device(device).type == "cuda" else 1.5,
    }
    if len(impls) > 1 or impls != ["reference"]:
        for impl in impls:
            out[f"{impl}_env_steps_per_s"] = med[impl]
            out[f"{impl}_policy_share"] = float(np.median(policy_share[impl]))
            if "reference" in med:
                out[f"{impl}_vs_reference"] = med[impl] / med["reference"]
    return out


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
    from recipes.harmodt.train import make_loss_fn

    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch, "tokens": 3 * (context + prompt_length),
            **compare_steps(lambda: PromptDT(39, 4, d_model=d_model, n_layer=n_layer),
                            _dt_batches(batch, context, prompt_length, kw.get("seed", 0)), make_loss_fn(True, False),
                            include=DT_TARGETS[0], exclude=DT_TARGETS[1], **kw)}


def mask_update(d_model: int = 128, n_layer: int = 6, batch: int = 8, context: int = 20, prompt_length: int = 5,
                n_tasks: int = 50, **kw) -> dict:
    """One full mask update of the Prompt-DT for N tasks (default 50, MT50) vs one training step."""
    from recipes.harmodt.train import make_loss_fn

    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch,
            **time_mask_update(lambda: PromptDT(39, 4, d_model=d_model, n_layer=n_layer),
                               _dt_batches(batch, context, prompt_length, kw.get("seed", 0), 4),
                               make_loss_fn(True, False), include=DT_TARGETS[0], exclude=DT_TARGETS[1],
                               n_tasks=n_tasks, **kw)}


def surgery_step(d_model: int = 128, n_layer: int = 3, batch: int = 16, context: int = 20, n_tasks: int = 10,
                 tasks_per_step: int | None = None, reps: int = 6, threads: int | None = None, seed: int = 0) -> dict:
    """Time per optimizer step of MTDT + mean / PCGrad / CAGrad (a batch of ``batch`` from each of
    ``tasks_per_step`` tasks, one backward each) vs a plain MTDT step (one task's batch), on the
    recipe's MTDT model (CPU profile size by default), interleaved round by round. Also the time
    of the surgery alone (Gram matrix, coefficients, writing .grad) and the per-task buffer size."""
    import statistics
    import time

    from maskmtl import DenseInitializer, MaskedAdamW, MaskedModel, MaskSet, select_targets
    from maskmtl.surgery import GradientSurgery, gram
    from recipes.common import MultiTaskStep
    from recipes.harmodt.train import make_loss_fn

    if threads:
        torch.set_num_threads(threads)
    k = n_tasks if tasks_per_step is None else tasks_per_step
    torch.manual_seed(seed)
    model = PromptDT(39, 4, d_model=d_model, n_layer=n_layer, use_prompt=False, n_tasks=n_tasks)
    targets = select_targets(model, DT_TARGETS[0], exclude=DT_TARGETS[1])
    masks = MaskSet(DenseInitializer().init_masks({t.name: t.shape for t in targets}, n_tasks,
                                                  torch.Generator().manual_seed(seed)), [f"t{i}" for i in range(n_tasks)])
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-4, weight_decay=1e-4)
    loss_fn = make_loss_fn(False, True)
    base = _dt_batches(batch, context, 1, seed, n=4)
    batches = [[dict(b, task=torch.full((batch,), t, dtype=torch.long)) for b in base] for t in range(n_tasks)]
    multi = {m: MultiTaskStep(GradientSurgery(list(model.parameters()), m, generator=torch.Generator().manual_seed(seed)),
                              n_tasks, k, "round_robin") for m in ("mean", "pcgrad", "cagrad")}

    def plain(i):
        task = i % n_tasks
        opt.zero_grad(set_to_none=True)
        loss_fn(mm.bind(task), task, batches[task][i % 4]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step(group=task)

    def combined(method):
        def step(i):
            opt.zero_grad(set_to_none=True)
            multi[method].backward(i + 1, None, lambda t: loss_fn(mm.bind(t), t, batches[t][i % 4]))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step(group=None)
        return step

    fns = {"mtdt": plain, **{m: combined(m) for m in multi}}
    for fn in fns.values():  # warm-up
        for i in range(2):
            fn(i)
    times = {name: [] for name in fns}
    for r in range(reps):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            t0 = time.perf_counter()
            fns[name](r)
            times[name].append(time.perf_counter() - t0)
    # the surgery alone, on the last step's per-task gradients
    grads = multi["pcgrad"].surgery.task_grads._buf[:k]
    surgery_ms = {}
    for name in ("pcgrad", "cagrad"):
        s = multi[name].surgery
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            a = s.weights(gram(grads))
            s.task_grads.write(a.to(grads.dtype) @ grads, [True] * len(s.task_grads.params))
            ts.append(time.perf_counter() - t0)
        surgery_ms[name] = 1000 * statistics.median(ts)
    med = {name: statistics.median(v) for name, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"MTDT d={d_model} layers={n_layer}", "batch_per_task": batch, "tasks": n_tasks, "tasks_per_step": k,
        "threads": torch.get_num_threads(), "params": n_params,
        "per_task_buffer_mb": k * n_params * 4 / 2**20,
        **{f"{name}_step_ms": 1000 * v for name, v in med.items()},
        **{f"{name}_vs_mtdt_step": med[name] / med["mtdt"] for name in multi},
        **{f"{name}_vs_mtdt_per_task_batch": med[name] / (k * med["mtdt"]) for name in multi},
        **{f"{name}_surgery_only_ms": v for name, v in surgery_ms.items()},
    }


def export(d_model: int = 128, n_layer: int = 6, batch: int = 1, context: int = 20, prompt_length: int = 5,
           granularity: str = "head", **kw) -> dict:
    """Exported per-task Prompt-DT (masked-out heads and MLP units removed) vs the masked full
    model at inference: parameters, file size, latency (``benchmarks.core.compare_export``)."""
    from recipes.harmodt.train import forward_kwargs

    torch.manual_seed(kw.get("seed", 0))
    model = PromptDT(39, 4, d_model=d_model, n_layer=n_layer)
    inputs = forward_kwargs(_dt_batches(batch, context, prompt_length, kw.get("seed", 0), 1)[0], True, False)
    return {"model": f"PromptDT d={d_model} layers={n_layer}", "batch": batch,
            **compare_export(model, inputs, include=DT_TARGETS[0], exclude=DT_TARGETS[1], granularity=granularity, **kw)}
