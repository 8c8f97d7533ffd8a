"""Benchmarks of the core: the measurements (``compare_steps``, ``time_mask_update``,
``compare_export``) for any model, and ``masked_step`` / ``mask_update`` on a generic causal
transformer (no recipe imports).

Run through ``python tools/bench.py masked-step-generic`` / ``mask-update-generic``; the Prompt-DT
benchmarks in ``benchmarks.harmodt`` use the same measurements. Dense and masked steps are
measured interleaved in the same process, so the ratio holds up on a shared, noisy machine.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

try:
    import resource
except ImportError:  # not Unix: no memory figures
    resource = None

import torch
from torch import nn

from maskmtl.apply import MaskedAdamW, MaskedModel
from maskmtl.initializers import ERKInitializer
from maskmtl.masks import MaskSet
from maskmtl.schedulers import ConstantScheduler
from maskmtl.scorers import FisherScorer
from maskmtl.targets import select_targets
from maskmtl.update import MaskUpdater


class CausalTransformer(nn.Module):
    """x [B, T, d_in] -> y [B, T, d_out]; a GPT-style pre-norm encoder with a causal mask."""

    def __init__(self, d_in: int = 43, d_out: int = 4, d_model: int = 128, n_layer: int = 6, n_head: int = 8,
                 dropout: float = 0.1, max_len: int = 128):
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.inp(x) + self.pos(torch.arange(t, device=x.device))  # (B, T, d)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.out(self.body(h, mask=causal, is_causal=True))  # (B, T, d_out)


def _masked_setup(make_model, include, exclude, n_tasks, density, seed, device="cpu"):
    torch.manual_seed(seed)
    model = make_model()
    targets = select_targets(model, include, exclude=exclude)
    shapes = {t.name: t.shape for t in targets}
    masks = MaskSet(ERKInitializer(density).init_masks(shapes, n_tasks, torch.Generator().manual_seed(seed)),
                    [f"task{i}" for i in range(n_tasks)])
    return model.to(device), masks.to(device)


def to_device(batch, device):
    """A batch (tensor, tuple/list or dict of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


def clock(device: torch.device):
    """perf_counter that first waits for queued CUDA work, so GPU timings are honest."""
    if device.type == "cuda":
        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def _transformer(d_model, n_layer):
    return lambda: CausalTransformer(d_model=d_model, n_layer=n_layer)


def _regression_batches(batch, seq, seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, seq, 43, generator=g), torch.randn(batch, seq, 4, generator=g)) for _ in range(n)]


def _loss(forward, task, batch):
    x, y = batch
    return (forward(x) - y).square().mean()


GENERIC_TARGETS = (r".*weight", r".*norm.*")


def _start(threads, device, batches):
    """A benchmark's start: torch threads, the device, its clock, the batches moved onto it."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    return device, clock(device), to_device(batches, device)


def _dense_step(model, opt, loss_fn, batches, n_tasks):
    """One dense training step on batch ``i`` (task ``i mod n_tasks``)."""
    def step(i):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, i % n_tasks, batches[i % len(batches)]).backward()
        opt.step()
    return step


def _masked_step(mm, opt, loss_fn, batches, n_tasks):
    """One masked training step on batch ``i``, under task ``i mod n_tasks``'s mask."""
    def step(i):
        task = i % n_tasks
        opt.zero_grad(set_to_none=True)
        loss_fn(mm.bind(task), task, batches[i % len(batches)]).backward()
        opt.step(group=task)
    return step


def compare_steps(make_model, batches, loss_fn, *, include, exclude=None, n_tasks=10, density=0.8, reps=15,
                  rounds=4, threads=None, seed=0, device="cpu", optimizer_impl="reference",
                  dense_fused=False) -> dict:
    """Median time of one training step (forward, backward, optimizer), masked vs dense, for any
    model: dense = the plain module with ``torch.optim.AdamW`` (``dense_fused``: its fused kernel);
    masked = ``MaskedModel`` (θ⊙M through functional_call) with ``MaskedAdamW(impl=optimizer_impl)``,
    a different task's mask each step. ``optimizer_impl`` may list several (``reference,compiled``):
    each is timed as its own masked step, interleaved with the dense one, and the optimizer steps
    alone are timed too (``optimizer_step_ms``)."""
    impls = optimizer_impl.split(",") if isinstance(optimizer_impl, str) else list(optimizer_impl)
    if len(impls) > 1:
        return _compare_impls(make_model, batches, loss_fn, impls, include=include, exclude=exclude, n_tasks=n_tasks,
                              density=density, reps=reps, rounds=rounds, threads=threads, seed=seed, device=device,
                              dense_fused=dense_fused)
    device, now, batches = _start(threads, device, batches)
    model, masks = _masked_setup(make_model, include, exclude, n_tasks, density, seed, device)
    dense_model, _ = _masked_setup(make_model, include, exclude, n_tasks, density, seed, device)
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-4, weight_decay=1e-4, impl=impls[0])
    dense_opt = torch.optim.AdamW(dense_model.parameters(), lr=1e-4, weight_decay=1e-4,
                                  **({"fused": True} if dense_fused else {}))

    dense_step = _dense_step(dense_model, dense_opt, loss_fn, batches, n_tasks)
    masked = _masked_step(mm, opt, loss_fn, batches, n_tasks)

    def timed(fn, i):
        t0 = now()
        fn(i)
        return now() - t0

    for fn in (dense_step, masked):  # warm-up
        for i in range(5):
            fn(i)
    # Alternate single steps (order flipped every pair) and take the median of per-pair ratios:
    # a slow phase of a shared machine then hits both sides of a pair alike.
    times = {"dense": [], "masked": []}
    ratios = []
    for i in range(reps * rounds):
        if i % 2:
            tm, td = timed(masked, i), timed(dense_step, i)
        else:
            td, tm = timed(dense_step, i), timed(masked, i)
        times["dense"].append(td)
        times["masked"].append(tm)
        ratios.append(tm / td)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "maskable": masks.numel(),
        "tasks": n_tasks,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dense_step_ms": 1000 * d,
        "masked_step_ms": 1000 * m,
        "ratio": statistics.median(ratios),
        "ratio_of_medians": m / d,
        "optimizer_impl": impls[0],
        "dense_optimizer": "AdamW(fused)" if dense_fused else "AdamW",
        "target_ratio": 1.05,
    }


def _compare_impls(make_model, batches, loss_fn, impls, *, include, exclude, n_tasks, density, reps, rounds, threads,
                   seed, device, dense_fused) -> dict:
    """``compare_steps`` for several ``MaskedAdamW`` implementations in one run: one model copy each,
    every round a dense step and each masked step (order rotating), median ratios to the dense step
    of the same round; then each optimizer's step alone (same gradients) vs the dense optimizer's."""
    device, now, batches = _start(threads, device, batches)
    dense_model, masks = _masked_setup(make_model, include, exclude, n_tasks, density, seed, device)
    dense_opt = torch.optim.AdamW(dense_model.parameters(), lr=1e-4, weight_decay=1e-4,
                                  **({"fused": True} if dense_fused else {}))
    runs = {}
    for impl in impls:
        model, _ = _masked_setup(make_model, include, exclude, n_tasks, density, seed, device)
        runs[impl] = (model, MaskedModel(model, masks),
                      MaskedAdamW(model.named_parameters(), masks, lr=1e-4, weight_decay=1e-4, impl=impl))

    fns = {"dense": _dense_step(dense_model, dense_opt, loss_fn, batches, n_tasks),
           **{impl: _masked_step(mm, opt, loss_fn, batches, n_tasks) for impl, (_, mm, opt) in runs.items()}}
    for fn in fns.values():  # warm-up (and the compiled update's compilation)
        for i in range(5):
            fn(i)
    times = {k: [] for k in fns}
    ratios = {impl: [] for impl in impls}
    names = list(fns)
    for i in range(reps * rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        t = {}
        for k in order:
            t0 = now()
            fns[k](i)
            t[k] = now() - t0
            times[k].append(t[k])
        for impl in impls:
            ratios[impl].append(t[impl] / t["dense"])
    # the optimizer steps alone, on the gradients the last steps left
    opt_times = {k: [] for k in fns}
    steppers = {"dense": dense_opt.step, **{impl: (lambda o: lambda i: o.step(group=i % n_tasks))(runs[impl][2])
                                            for impl in impls}}
    for i in range(4 * reps):
        for k in names:
            t0 = now()
            steppers[k](i) if k != "dense" else steppers[k]()
            opt_times[k].append(now() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    opt_med = {k: statistics.median(v) for k, v in opt_times.items()}
    return {
        "params": sum(p.numel() for p in dense_model.parameters()),
        "maskable": masks.numel(),
        "tasks": n_tasks,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dense_optimizer": "AdamW(fused)" if dense_fused else "AdamW",
        "dense_step_ms": 1000 * med["dense"],
        **{f"masked_step_ms[{impl}]": 1000 * med[impl] for impl in impls},
        **{f"ratio[{impl}]": statistics.median(ratios[impl]) for impl in impls},
        "dense_optimizer_step_ms": 1000 * opt_med["dense"],
        **{f"optimizer_step_ms[{impl}]": 1000 * opt_med[impl] for impl in impls},
        **{f"optimizer_step_vs_dense[{impl}]": opt_med[impl] / opt_med["dense"] for impl in impls},
        "target_ratio": 1.05,
    }


def masked_step(d_model: int = 128, n_layer: int = 6, batch: int = 8, seq: int = 75, **kw) -> dict:
    """``compare_steps`` on a generic 1.2 M-parameter causal transformer (no recipe needed)."""
    return {"model": f"causal transformer d={d_model} layers={n_layer}", "batch": batch, "seq": seq,
            **compare_steps(_transformer(d_model, n_layer), _regression_batches(batch, seq, kw.get("seed", 0)), _loss,
                            include=GENERIC_TARGETS[0], exclude=GENERIC_TARGETS[1], **kw)}


def _rss_mb() -> float | None:
    """This process's resident memory now, MiB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    """The process's resident-memory high-water mark since it started, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_mask_update(make_model, batches, loss_fn, *, include, exclude=None, n_tasks=10, grad_batches=1, alpha=100,
                     update_every=5000, density=0.8, recovery="dense", reps=20, threads=None, seed=0,
                     device="cpu", diagnostics_rounds=0, float_cache="all", update_memory="full") -> dict:
    """One full mask update for N tasks (gradients, Fisher scores, swap) as a multiple of one
    masked training step, and amortised over ``update_every`` steps as a % of training time.

    ``diagnostics_rounds`` > 0 also measures what the update's diagnostics cost (``MaskUpdater``'s
    ``diagnostics``, tracked as the recipes track them): that many rounds, each one update with
    and one without them on copies of the same model, masks and optimizer (order alternating);
    medians and their ratio.

    Memory (CPU, Linux): the resident memory before the update and the process's high-water mark
    after it; ``update_peak_above_mb`` is their difference, the update's transient peak above the
    trained state (exact when nothing earlier in the process went higher, which
    ``max_rss_before_mb`` shows). ``float_cache`` is ``MaskSet.float_cache``; ``float_cache_mb`` what
    its float masks hold after the timed steps; ``update_memory`` is ``MaskUpdater.memory``. Run it in
    a fresh process per setting."""
    device, now, batches = _start(threads, device, batches)
    model, masks = _masked_setup(make_model, include, exclude, n_tasks, density, seed, device)
    masks.float_cache = float_cache
    mm = MaskedModel(model, masks)
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-4)
    upd = MaskUpdater(FisherScorer(), ConstantScheduler(alpha), every=update_every, recovery_gradient=recovery,
                      memory=update_memory)
    upd.track(masks)  # as the recipes do: the tracked diagnostics are part of the update's cost

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss_fn(mm.bind(i % n_tasks), i % n_tasks, batches[i % len(batches)]).backward()
        opt.step(group=i % n_tasks)

    for i in range(5):
        step(i)
    step_times = []
    for i in range(reps):
        t0 = now()
        step(i)
        step_times.append(now() - t0)
    gc.collect()
    rss_before, max_before = _rss_mb(), _max_rss_mb()
    cache_mb = masks.float_cache_bytes() / 2**20
    t0 = now()
    metrics = upd.update(update_every, model, masks, loss_fn, lambda t: batches[:grad_batches], optimizer=opt)
    t_update = now() - t0
    max_after = _max_rss_mb()
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    memory = {} if rss_before is None or resource is None or device.type != "cpu" else {
        "model_mb": params_mb, "bool_masks_mb": sum(m.numel() for m in masks.as_dict().values()) / 2**20,
        "float_cache": float_cache, "update_memory": update_memory, "float_cache_mb": cache_mb, "rss_before_update_mb": rss_before,
        "max_rss_before_mb": max_before, "update_peak_above_mb": max(0.0, max_after - rss_before)}  # the kernel's high-water mark lags by < 1 MiB
    s = statistics.median(step_times)
    cost = {}
    if diagnostics_rounds:
        cost = _diagnostics_cost(model, masks, opt, loss_fn, lambda t: batches[:grad_batches], alpha, update_every,
                                 recovery, int(diagnostics_rounds), now)
    return cost | memory | {
        "tasks": n_tasks,
        "device": str(device),
        "grad_batches": grad_batches,
        "recovery_gradient": recovery,
        "maskable": masks.numel(),
        "step_ms": 1000 * s,
        "update_s": t_update,
        "update_gradients_s": metrics["time/mask_gradients_s"],
        "update_in_steps": t_update / s,
        "amortised_pct": 100 * t_update / (update_every * s + t_update),
        "update_every": update_every,
        "target_pct": 2.0,
    }


def _diagnostics_cost(model, masks, opt, loss_fn, score_batches, alpha, update_every, recovery, rounds, now) -> dict:
    """Median seconds of one mask update with and without its diagnostics, on copies of one state."""
    import copy

    times = {True: [], False: []}
    for r in range(rounds):
        for diag in ((True, False) if r % 2 == 0 else (False, True)):
            m, k = copy.deepcopy(model), copy.deepcopy(masks)
            o = MaskedAdamW(m.named_parameters(), k, lr=1e-4)
            o.load_state_dict(opt.state_dict())
            upd = MaskUpdater(FisherScorer(), ConstantScheduler(alpha), every=update_every, recovery_gradient=recovery,
                              diagnostics=diag)
            if diag:
                upd.track(k)
            t0 = now()
            upd.update(update_every, m, k, loss_fn, score_batches, optimizer=o)
            times[diag].append(now() - t0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"update_with_diagnostics_s": on, "update_without_diagnostics_s": off,
            "diagnostics_ratio": on / off, "diagnostics_rounds": rounds}


def mask_update(d_model: int = 128, n_layer: int = 6, batch: int = 8, seq: int = 75, **kw) -> dict:
    """``time_mask_update`` on the generic causal transformer."""
    return {"model": f"causal transformer d={d_model} layers={n_layer}",
            **time_mask_update(_transformer(d_model, n_layer), _regression_batches(batch, seq, kw.get("seed", 0), 4),
                               _loss, include=GENERIC_TARGETS[0], exclude=GENERIC_TARGETS[1], **kw)}


def compare_export(model, example_inputs, *, include, exclude=None, granularity="head", density=0.5,
                   n_tasks=10, task=0, reps=15, rounds=4, threads=None, seed=0) -> dict:
    """Exported (pruned, dense) model vs the masked full model for one task: parameters, file size
    (safetensors of each model's state dict) and inference latency (eval, no grad), single calls
    alternated in one process; the latency figures are median paired ratios, against the masked
    model (what a task runs today) and against the full model without masks (pruning alone). Masks are drawn by
    the structured random initializer at ``density`` (structures kept per family and task)."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from maskmtl.export import call, export_pruned, save_export
    from maskmtl.initializers import RandomInitializer
    from maskmtl.structures import build_structures

    if threads:
        torch.set_num_threads(threads)
    model.eval()
    names = [t.name for t in select_targets(model, include, exclude=exclude)]
    smap = build_structures(model, names, granularity, example_inputs)
    masks = MaskSet(smap.init_masks(RandomInitializer(density), n_tasks, torch.Generator().manual_seed(seed)),
                    [f"task{i}" for i in range(n_tasks)])
    ex = export_pruned(model, masks.group(task), smap, example_inputs)
    mm = MaskedModel(model, masks)
    with tempfile.TemporaryDirectory(prefix="maskmtl-export-bench-") as tmp:
        full_file = Path(tmp) / "full.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(full_file))
        out = save_export(ex, Path(tmp) / "export", model_config={}, source={"task": task})
        sizes = {"full_file_bytes": full_file.stat().st_size, "exported_file_bytes": (out / "model.safetensors").stat().st_size}

    def masked_call():
        if isinstance(example_inputs, dict):
            return mm.forward_group(task, **example_inputs)
        return mm.forward_group(task, *example_inputs)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    exported_call = lambda: call(ex.model, example_inputs)  # noqa: E731
    dense_call = lambda: call(model, example_inputs)  # noqa: E731  (the full model without masks)
    times = {"masked": [], "exported": [], "dense": []}
    ratios, dense_ratios = [], []
    with torch.no_grad():
        for fn in (masked_call, exported_call, dense_call):  # warm-up
            for _ in range(3):
                fn()
        for i in range(reps * rounds):
            if i % 2:
                te, tm, td = timed(exported_call), timed(masked_call), timed(dense_call)
            else:
                td, tm, te = timed(dense_call), timed(masked_call), timed(exported_call)
            times["masked"].append(tm)
            times["exported"].append(te)
            times["dense"].append(td)
            ratios.append(te / tm)
            dense_ratios.append(te / td)
    return {
        "granularity": granularity,
        "density": density,
        "structures": smap.n_structures,
        "structures_kept": int(smap.to_structures({n: m[None] for n, m in masks.group(task).items()}).sum()),
        "threads": torch.get_num_threads(),
        "params_full": ex.params_full,
        "params_exported": ex.params_pruned,
        "params_ratio": ex.params_pruned / ex.params_full,
        **sizes,
        "file_ratio": sizes["exported_file_bytes"] / sizes["full_file_bytes"],
        "masked_ms": 1000 * statistics.median(times["masked"]),
        "exported_ms": 1000 * statistics.median(times["exported"]),
        "dense_ms": 1000 * statistics.median(times["dense"]),
        "latency_ratio": statistics.median(ratios),  # exported / masked full model
        "latency_ratio_vs_dense": statistics.median(dense_ratios),  # exported / full model without masks
        "max_abs_diff": ex.max_abs_diff,
    }
