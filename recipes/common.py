"""Pieces every recipe's loop shares: run directory rules, task sampling, result files and table."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from maskmtl.outputs import CHECKPOINT, METRICS, RESULTS, read_metrics, write_json


class RunDirError(RuntimeError):
    """The run directory holds a finished run; nothing is overwritten."""


def run_dir() -> Path:
    """Hydra's output directory for this run (or sweep job)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def resume_point(out: Path) -> Path | None:
    """The checkpoint to resume from, ``None`` for a fresh run; refuses a finished run's folder."""
    if (out / RESULTS).exists():
        raise RunDirError(f"{out} already holds a finished run ({RESULTS}); nothing was overwritten. "
                          f"Choose another hydra.run.dir (or delete that folder) to run again.")
    ckpt = out / CHECKPOINT
    return ckpt if ckpt.exists() else None


def restore_run(out: Path, *, model, masks, optimizer, generators: dict, numpy_rngs: dict | None = None,
                device=None, updater=None) -> tuple[int, dict, Path | None]:
    """Resume from ``out``'s checkpoint when it has one: model, masks, optimizer and torch
    generators are loaded, the numpy generators (saved under ``extra["numpy_rngs"]``) restored in
    place, and ``updater`` (a MaskUpdater) from ``extra["updater"]``. Returns ``(step, extra,
    checkpoint)``; ``(0, {}, None)`` for a fresh run."""
    from maskmtl import load_checkpoint

    ckpt = resume_point(out)
    if ckpt is None:
        return 0, {}, None
    state = load_checkpoint(ckpt, model=model, masks=masks, optimizer=optimizer, generators=generators,
                            map_location=device)
    for k, r in (numpy_rngs or {}).items():
        r.bit_generator.state = state["extra"]["numpy_rngs"][k]
    if updater is not None and "updater" in state["extra"]:  # the tracked mask-update diagnostics
        updater.load_state_dict(state["extra"]["updater"])
    if "metrics_rows" in state["extra"]:  # the log as it was at the checkpoint (rows of its step included)
        trim_metrics(out / METRICS, int(state["extra"]["metrics_rows"]))
    print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state["extra"], ckpt


def metrics_rows(path: Path) -> int:
    """Rows in a metrics log now (for a checkpoint taken at a step whose rows may be followed by
    more rows of the same step, e.g. the final evaluation's)."""
    return len(read_metrics(path)) if path.exists() else 0


def trim_metrics(path: Path, rows: int) -> None:
    """Keep the first ``rows`` rows of a metrics log (what it held when the checkpoint was taken)."""
    from maskmtl.masks import atomic_write_bytes

    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) > rows:
        atomic_write_bytes(path, "".join(line + "\n" for line in lines[:rows]).encode())


def start_run(cfg: DictConfig):
    """The start every recipe shares: validate ``train.*``, set threads, pick the device, seed the
    global RNGs. Returns ``(t_start, device, run_dir)``."""
    import time

    from maskmtl.config import choose_device

    t_start = time.perf_counter()
    threads = resolve_threads(cfg.get("threads"))
    check_train_config(cfg)
    if threads is not None:
        set_threads(threads)
    device = choose_device(cfg.device)
    seed_everything(cfg.seed)
    return t_start, device, run_dir()


THREADS_AUTO_MAX = 1  # `threads: auto` uses at most this many threads (see conf/config.yaml)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity: SLURM's or taskset's cores), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def resolve_threads(value: Any) -> int | None:
    """The ``threads`` key: an integer >= 1 as given, ``auto`` = min(cores available to this
    process, ``THREADS_AUTO_MAX``), ``None`` (null) = leave torch's default."""
    from maskmtl.config import ConfigError

    if value is None:
        return None
    if value == "auto":
        return min(available_cores(), THREADS_AUTO_MAX)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"threads={value!r}: expected an integer >= 1, auto (min(available cores, "
                      f"{THREADS_AUTO_MAX})) or null (torch's default: every core)")


def set_threads(n: int) -> None:
    """``n`` threads for torch and for the BLAS / OpenMP pools numpy and scipy loaded."""
    torch.set_num_threads(int(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it only torch is limited
        return
    threadpool_limits(int(n))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_generator(seed: int, offset: int) -> torch.Generator:
    """An explicit CPU generator for one random stream (data, masks, task order …)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + offset)


TASK_SAMPLING = ("round_robin", "uniform")


def train_keys() -> list:
    """``(key, check, expected)`` rows of the shared ``train.*`` keys (``maskmtl.config.check_keys``)."""
    from maskmtl.apply import OPTIMIZER_IMPLS
    from maskmtl.config import is_int, is_number

    return [
        ("train.steps", is_int(1), "an integer >= 1"),
        ("train.batch_size", is_int(1), "an integer >= 1"),
        ("train.lr", is_number(0, lo_open=True), "a finite number > 0"),
        ("train.weight_decay", is_number(0), "a finite number >= 0"),
        ("train.betas", lambda v: len(v) == 2 and all(is_number(0, 1, hi_open=True)(b) for b in v),
         "a list of two numbers in [0, 1), e.g. [0.9, 0.999]"),
        ("train.grad_clip", lambda v: v is None or is_number(0, lo_open=True)(v), "null or a finite number > 0"),
        ("train.warmup_steps", is_int(0), "an integer >= 0"),
        ("train.task_sampling", lambda v: v in TASK_SAMPLING, f"one of {TASK_SAMPLING}"),
        ("train.log_every", is_int(1), "an integer >= 1"),
        ("train.eval_every", is_int(0), "an integer >= 0 (0: never)"),
        ("train.checkpoint_every", is_int(0), "an integer >= 0 (0: only at the end)"),
        ("train.optimizer_impl", lambda v: v in OPTIMIZER_IMPLS, f"one of {OPTIMIZER_IMPLS}"),
    ]


def check_train_config(cfg: DictConfig) -> None:
    """Validate the shared ``train.*`` keys before anything is built (every bad key listed at once)."""
    from maskmtl.config import check_keys

    check_keys(cfg, train_keys())
    if "gradient" in cfg.train:  # recipes whose loop offers gradient surgery (harmodt)
        check_gradient_config(cfg)


GRADIENTS = ("plain", "mean", "pcgrad", "cagrad")


def check_gradient_config(cfg: DictConfig) -> None:
    """Validate ``train.gradient``, ``train.tasks_per_step`` and ``train.cagrad_c``."""
    from maskmtl.config import ConfigError, require

    kind = require(cfg, "train.gradient", lambda v: v in GRADIENTS, f"one of {GRADIENTS}")
    k = cfg.train.tasks_per_step
    if kind == "plain" and k is not None:
        raise ConfigError(f"train.tasks_per_step={k!r}: only used with train.gradient=mean|pcgrad|cagrad "
                          f"(train.gradient=plain trains one task per step); leave it null")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ConfigError(f"train.tasks_per_step={k!r}: expected null (all tasks) or an integer >= 1")
    if kind in ("pcgrad", "cagrad") and k == 1:
        raise ConfigError(f"train.tasks_per_step=1: train.gradient={kind} needs at least 2 tasks per step")
    require(cfg, "train.cagrad_c", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
            "a number in [0, 1) (CAGrad's c)")


class MultiTaskStep:
    """The gradient of one step from several tasks (``train.gradient=mean|pcgrad|cagrad``).

    Each step draws ``tasks_per_step`` tasks (``round_robin``: the next block of consecutive tasks,
    cycling; ``uniform``: a random subset from the task generator; all tasks when it equals N), one
    batch of ``train.batch_size`` from each, takes one backward pass per task (each graph freed
    before the next task's forward) and writes the combined gradient into the parameters' ``.grad``
    (``maskmtl.surgery``). PCGrad's random orders come from ``generators["surgery"]``, which the
    recipe checkpoints with its other generators.
    """

    def __init__(self, surgery, n_tasks: int, tasks_per_step: int, mode: str):
        self.surgery, self.n_tasks, self.tasks_per_step, self.mode = surgery, n_tasks, tasks_per_step, mode
        self.generators = {"surgery": surgery.generator} if surgery.generator is not None else {}

    def tasks(self, step: int, generator: torch.Generator) -> list[int]:
        """The tasks of 1-based ``step``."""
        n, k = self.n_tasks, self.tasks_per_step
        if k == n:
            return list(range(n))
        if self.mode == "round_robin":
            return sorted(((step - 1) * k + i) % n for i in range(k))
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    def backward(self, step: int, generator: torch.Generator, loss_of) -> torch.Tensor:
        """``loss_of(task)`` builds one task's loss on a fresh batch; returns the mean loss."""
        from functools import partial

        return self.surgery.backward([partial(loss_of, t) for t in self.tasks(step, generator)])


def multi_task_step(train, seed: int, model: torch.nn.Module, masking, n_tasks: int) -> MultiTaskStep | None:
    """``None`` for ``train.gradient=plain``, else the step builder (checks the masks are dense).
    ``train``: the ``TrainSpec`` (``recipes/loop.py``), its gradient keys checked before
    (``check_gradient_config``)."""
    from maskmtl.config import ConfigError
    from maskmtl.surgery import GradientSurgery

    kind = train.gradient
    if kind == "plain":
        return None
    k = n_tasks if train.tasks_per_step is None else int(train.tasks_per_step)
    if k > n_tasks:
        raise ConfigError(f"train.tasks_per_step={k}: expected at most the number of tasks ({n_tasks})")
    if kind in ("pcgrad", "cagrad") and n_tasks < 2:
        raise ConfigError(f"train.gradient={kind}: needs at least 2 tasks, the data has {n_tasks}")
    updates = masking.updater.every > 0 and masking.scheduler.max_alpha() > 0
    if not bool((masking.masks.density() == 1.0).all()) or updates:
        raise ConfigError(f"train.gradient={kind}: combines dense per-task gradients into one dense step, so it "
                          f"needs all-ones masks that never change (initializer=dense scheduler=frozen, as "
                          f"method=mtdt_mean|pcgrad|cagrad set)")
    gen = make_generator(seed, 5) if kind == "pcgrad" else None
    surgery = GradientSurgery(list(model.parameters()), kind, c=float(train.cagrad_c), reduction="mean",
                              generator=gen)
    return MultiTaskStep(surgery, n_tasks, k, train.task_sampling)


def next_task(step: int, n_tasks: int, mode: str, generator: torch.Generator) -> int:
    """Task trained at 1-based ``step``: ``round_robin`` cycles, ``uniform`` draws."""
    if mode == "round_robin":
        return (step - 1) % n_tasks
    if mode == "uniform":
        return int(torch.randint(n_tasks, (1,), generator=generator))
    raise ValueError(f"train.task_sampling={mode!r}: expected round_robin or uniform")


def chosen_options(cfg: DictConfig) -> dict[str, Any]:
    """The config groups' choices (scorer=…, initializer=…) as Hydra recorded them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not under Hydra (tests building cfg by hand)
        choices = {}
    return {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None}


def write_results(out: Path, cfg: DictConfig, *, tasks: list[str], per_task: Mapping[str, Mapping[str, float]], headline: str,
                  steps: int, wall_time_s: float, extra: Mapping[str, Any] | None = None,
                  means: Mapping[str, float] | None = None) -> dict:
    """Write ``results.json`` (output contract) and return it. Its ``mean``: each per-task metric's mean
    over the tasks, then ``means`` (run-level metrics, e.g. the unseen tasks'; a name clashing with a
    per-task metric is refused)."""
    out_means = {}
    for metric in next(iter(per_task.values())):
        out_means[metric] = float(np.mean([v[metric] for v in per_task.values()]))
    clash = sorted(set(out_means) & set(means or {}))
    if clash:
        raise ValueError(f"run-level means {clash} clash with per-task metrics of the same names")
    means = out_means | {k: float(v) for k, v in (means or {}).items()}
    results = {
        "recipe": cfg.recipe_name,
        "options": chosen_options(cfg),
        "seed": int(cfg.seed),
        "tasks": list(tasks),
        "per_task": {k: dict(v) for k, v in per_task.items()},
        "mean": means,
        "headline": {"name": headline, "value": means[headline]},
        "steps": int(steps),
        "wall_time_s": float(wall_time_s),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **dict(extra or {}),
    }
    write_json(out / RESULTS, results)
    return results


def print_table(title: str, per_task: Mapping[str, Mapping[str, float]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    metrics = list(next(iter(per_task.values())))
    table = Table(title=title)
    table.add_column("task")
    for m in metrics:
        table.add_column(m, justify="right")
    for task, vals in per_task.items():
        table.add_row(task, *(f"{vals[m]:.4f}" for m in metrics))
    table.add_row("[b]mean[/b]", *(f"[b]{np.mean([v[m] for v in per_task.values()]):.4f}[/b]" for m in metrics))
    console.print(table)


# ---------------------------------------------------------------------------------- progress
# One mechanism for every phase of every recipe (data generation, training, mask updates,
# evaluation): on a terminal, rich bars (phases that run inside another, such as an evaluation
# during training, add a row to the same live display); off a terminal (CI, log files, SLURM),
# plain flushed lines: when a phase starts and ends, at every ``fraction`` of its total, and at
# least every ``PROGRESS_INTERVAL_S`` seconds while it advances. Progress only prints.

PROGRESS_INTERVAL_S = 30.0  # off a terminal: the longest silence while a phase advances
_ACTIVE: list["phase"] = []  # phases open now, outermost first
_LIVE: dict[str, Any] = {}  # the shared rich Progress while a phase is open on a terminal


def _clock(seconds: float) -> str:
    """``4.2 s`` under a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds < 59.95:
        return f"{max(seconds, 0.0):.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def say(message: str) -> None:
    """One line, now: above the live bars on a terminal, a flushed plain line off it."""
    if "bar" in _LIVE:
        _LIVE["bar"].console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        print(message, flush=True)


class phase:
    """Where one phase is (a context manager).

    Args:
        description: the phase's name, the start of every line it prints.
        total: the count it advances to (``None``: no count, only start and end).
        unit: what it counts.
        start: the count already done (a resumed run).
        fraction: off a terminal, a line at every this fraction of ``total`` (``None``: only the
            time-based lines).
        announce: ``True``: a start line (off a terminal) and an end line (always); ``"long"``:
            only an end line, and only if the phase printed a time-based line (a long phase);
            ``False``: neither.
        detail: more about the phase, for its start line.

    ``advance(n, info=…)`` moves it on (``info``: extra text shown with the count); ``result``
    (a string) is added to the end line; ``exclude(seconds)`` takes time spent on other work out
    of the rate (the time of phases opened inside this one is excluded by itself).
    """

    def __init__(self, description: str, total: int | None = None, *, unit: str = "steps", start: int = 0,
                 fraction: float | None = 0.1, announce: bool | str = True, detail: str = ""):
        self.description, self.total, self.unit, self.detail = description, total, unit, detail
        self.done = self._start = int(start)
        self.fraction, self.announce = fraction, announce
        self.info, self.result = "", ""
        self.live = False
        self._excluded = 0.0
        self._printed_timed = False

    # -- lifecycle
    def __enter__(self) -> "phase":
        import time

        self._t0 = self._last_line = time.perf_counter()
        self.depth = len(_ACTIVE)
        if _ACTIVE:
            self.live = _ACTIVE[-1].live
        else:
            from rich.console import Console

            self.live = Console().is_terminal
        if self.live:
            if "bar" not in _LIVE:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                               transient=True)
                bar.start()
                _LIVE["bar"] = bar
            self._task = _LIVE["bar"].add_task("  " * self.depth + self.description, total=self.total,
                                               completed=self.done, info="")
        elif self.announce is True:
            about = [f"{self.total - self.done} {self.unit}" + (f" from {self.done}" if self.done else "")
                     if self.total is not None else "", self.detail]
            about = ", ".join(a for a in about if a)
            print(f"{self._indent}{self.description}: started" + (f" ({about})" if about else ""), flush=True)
        self._next_mark = self._mark_after(self.done)
        _ACTIVE.append(self)
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        import time

        elapsed = time.perf_counter() - self._t0
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        if _ACTIVE:  # the enclosing phase waited all this time: not its own work
            _ACTIVE[-1].exclude(elapsed)
        if self.live:
            bar = _LIVE.get("bar")
            if bar is not None:
                bar.remove_task(self._task)
                if not _ACTIVE:
                    bar.stop()
                    _LIVE.pop("bar")
        if self.announce is True or (self.announce == "long" and self._printed_timed):
            count = f" at {self.done}/{self.total} {self.unit}" if self.total is not None else ""
            if exc_type is None:
                line = f"done in {_clock(elapsed)}" + (f", {self.result}" if self.result else "")
            else:
                line = f"stopped{count} after {_clock(elapsed)} ({exc_type.__name__})"
            say(f"{self._indent}{self.description}: {line}")
        return False

    # -- reporting
    @property
    def _indent(self) -> str:
        return "  " * getattr(self, "depth", 0)

    def _mark_after(self, done: int) -> float:
        if self.total is None or not self.fraction:
            return float("inf")
        every = max(1, int(self.total * self.fraction))
        return (done // every + 1) * every

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (spent on other work) out of this phase's rate."""
        self._excluded += float(seconds)

    def rate(self) -> float:
        """Count per second of this phase's own time."""
        import time

        own = time.perf_counter() - self._t0 - self._excluded
        return (self.done - self._start) / max(own, 1e-9)

    def eta(self) -> float | None:
        """Seconds left, extrapolating the wall time so far (time of nested phases included)."""
        import time

        if self.total is None or self.done <= self._start:
            return None
        wall = time.perf_counter() - self._t0
        return (self.total - self.done) * wall / (self.done - self._start)

    def line(self) -> str:
        import time

        parts = [f"{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %)"
                 if self.total is not None else f"{self.done} {self.unit}",
                 f"{self.rate():.2f} {self.unit}/s"]
        if self.info:
            parts.append(self.info)
        parts.append(f"elapsed {_clock(time.perf_counter() - self._t0)}")
        eta = self.eta()
        if eta is not None and self.done < self.total:
            parts.append(f"ETA {_clock(eta)}")
        return f"{self._indent}{self.description}: " + ", ".join(parts)

    def advance(self, n: int = 1, info: str | None = None) -> None:
        import time

        self.done += n
        if info is not None:
            self.info = info
        if self.live:
            shown = f"{self.rate():.2f} {self.unit}/s" + (f", {self.info}" if self.info else "")
            _LIVE["bar"].update(self._task, completed=self.done, info=shown)
            return
        now = time.perf_counter()
        at_mark = self.done >= self._next_mark or (self.total is not None and self.done == self.total
                                                   and self.fraction)
        timed = now - self._last_line >= PROGRESS_INTERVAL_S
        if at_mark or timed:
            print(self.line(), flush=True)
            self._last_line = now
            self._next_mark = self._mark_after(self.done)
            self._printed_timed |= timed


class training_progress(phase):
    """The training phase: steps with steps/s (training time only: evaluations and mask updates
    are left out), the loss, and an ETA. ``mask_update(step, metrics)`` reports one mask update."""

    def __init__(self, total: int, start: int = 0, description: str = "train"):
        super().__init__(description, total, unit="steps", start=start)

    def advance(self, loss: float) -> None:  # type: ignore[override]
        super().advance(1, info=f"loss {loss:.4f}")

    def __exit__(self, *exc) -> bool:
        if self.done > self._start:
            self.result = (f"{self.done - self._start} steps at {self.rate():.2f} steps/s (evaluations and mask "
                           f"updates left out), last {self.info}")
        return super().__exit__(*exc)

    def mask_update(self, step: int, metrics: dict) -> dict:
        """One line for a mask update (``MaskUpdater.update``'s metrics, returned unchanged)."""
        seconds = float(metrics.get("time/mask_update_s", 0.0))
        self.exclude(seconds)
        parts = [f"{metrics['mask/swapped']:.0f} swapped" if "mask/swapped" in metrics else None,
                 f"{metrics['mask/revived']:.0f} revived" if "mask/revived" in metrics else None,
                 f"harmony {metrics['mask/harmony']:.4g}" if metrics.get("mask/harmony") is not None else None,
                 f"density {metrics['mask/density_mean']:.3f}" if "mask/density_mean" in metrics else None,
                 f"{seconds:.1f} s"]
        say(f"{self._indent}mask update at step {step}: " + ", ".join(p for p in parts if p))
        return metrics


def evaluation(description: str, n_tasks: int, ev: Any = None) -> phase:
    """The phase of one evaluation; set its ``result`` (e.g. the mean success) for the end line.
    ``ev``: a Meta-World recipe's ``eval`` settings (an ``EvalSpec`` or a mapping), described in the
    start line."""
    detail = f"{n_tasks} tasks"
    if ev is not None:
        get = ev.get if isinstance(ev, Mapping) else lambda key: getattr(ev, key)  # a mapping or an EvalSpec
        n = int(get("episodes"))
        detail += (f" x {n} episode{'s' if n != 1 else ''}, {get('parallel')} at a time per task, up to "
                   f"{get('max_steps')} steps each")
    return phase(description, detail=detail)


def save_figure(fig, png: Path, title: str) -> None:
    """Title, lay out and write a matplotlib figure as PNG atomically, then close it."""
    import io

    import matplotlib.pyplot as plt

    from maskmtl.masks import atomic_write_bytes

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def plot_curves(metrics_path: Path, png: Path, title: str):
    """``curves.png`` from ``metrics.jsonl``: every ``eval/…`` per-task curve and their mean
    (markers at each evaluation, lines between), the training loss (``train/loss``, with a running
    mean; log scale when it falls by 4x or more; mask updates dotted), and ``mask/harmony`` at each
    mask update. Returns the figure (closed, for inspection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskmtl.outputs import read_metrics

    rows = read_metrics(metrics_path)

    def series(key: str, skip: str | None = None) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None and not (skip and skip in r)]

    # in the order the run logged them (its task order)
    loss_like = ("heldout_mse", "loss")  # evaluation losses are not drawn on the success / accuracy axes
    eval_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval/") and k.count("/") >= 2
                                   and not k.endswith(loss_like)))
    mean_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval/mean")))
    suffixes = {k.rsplit("/", 1)[1] for k in eval_keys}
    metric = suffixes.pop() if len(suffixes) == 1 else None  # one metric: named once, on the axis
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), gridspec_kw={"width_ratios": [3.2, 1.0, 2.6, 2.2]})
    ax_eval, ax_legend, ax_loss, ax_h = axes
    last = max((r["step"] for r in rows), default=1)
    colors = plt.get_cmap("tab10" if len(eval_keys) <= 10 else "tab20")
    # tasks side by side, over a third of the gap between evaluations: equal values stay visible
    eval_steps = sorted({r["step"] for r in rows if any(k in r for k in eval_keys)})
    gap = min(np.diff(eval_steps), default=0.1 * last) if len(eval_steps) > 1 else 0.1 * last
    dodge = gap / 3 / max(len(eval_keys) - 1, 1)
    for i, k in enumerate(eval_keys):
        pts = series(k)
        if pts:
            label = k.removeprefix("eval/").removesuffix(f"/{metric}") if metric else k.removeprefix("eval/")
            x = [s_ + (i - (len(eval_keys) - 1) / 2) * dodge for s_, _ in pts]
            ax_eval.plot(x, [v for _, v in pts], marker="o", ms=4, lw=1, alpha=0.75, color=colors(i % colors.N),
                         label=label)
    mean_styles = ({"color": "k", "ls": "-"}, {"color": "0.4", "ls": "--"}, {"color": "0.6", "ls": ":"})
    for k, style in zip(mean_keys, mean_styles):
        pts = series(k)
        if pts:
            ax_eval.plot(*zip(*pts), marker="s", ms=6, lw=2.2, label=k.removeprefix("eval/"), **style)
    values = [v for k in eval_keys + mean_keys for _, v in series(k)]
    if values and min(values) >= 0 and max(values) <= 1:
        ax_eval.set_ylim(-0.04, 1.04)
    if not values:
        ax_eval.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set(xlabel="step (tasks dodged sideways)", ylabel=metric or "evaluation metric", title="evaluation")
    ax_eval.grid(alpha=0.3)
    handles, labels = ax_eval.get_legend_handles_labels()
    ax_legend.set_axis_off()
    if handles:
        ax_legend.legend(handles, labels, loc="upper left", fontsize=7 if len(handles) <= 24 else 5,
                         ncol=1 if len(handles) <= 24 else 2, frameon=False, borderaxespad=0)

    loss = series("train/loss")
    if loss:
        steps_, vals = map(np.asarray, zip(*loss))
        w = min(len(vals), max(1, len(vals) // 15))
        ax_loss.plot(steps_, vals, lw=0.8 if w > 1 else 1.5, alpha=0.45 if w > 1 else 1.0, color="C0",
                     marker="" if len(vals) > 30 else ".", label="train/loss (one batch)")
        if w > 1:
            smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
            ax_loss.plot(steps_[w - 1:], smooth, lw=2, color="C0", label=f"running mean of {w}")
        if vals.min() > 0 and vals.max() / vals.min() >= 4:  # log scale when the loss falls a lot
            from matplotlib.ticker import FormatStrFormatter

            ax_loss.set_yscale("log")
            ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax_loss.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    gate = series("train/gate_loss", skip="train/gate_step")  # simultaneous gate training; "after" is logged apart
    if gate:
        ax_loss.plot(*zip(*gate), lw=1, color="C1", label="train/gate_loss")
    updates = [r["step"] for r in rows if "mask/swapped" in r]
    for j, s_ in enumerate(updates):
        ax_loss.axvline(s_, color="0.5", lw=0.8, ls=":", label="mask update" if j == 0 else None)
    if loss or gate:
        ax_loss.legend(fontsize=7)
    else:
        ax_loss.text(0.5, 0.5, "no train/loss logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3, which="both")

    pts = series("mask/harmony")
    if pts:
        ax_h.plot(*zip(*pts), marker="o", ms=4)
    else:
        ax_h.text(0.5, 0.5, "no mask updates", ha="center", va="center", transform=ax_h.transAxes)
    ax_h.set(xlabel="step", ylabel="harmony (Def. 3.2)", title="harmony at mask updates")
    ax_h.grid(alpha=0.3)
    for ax in (ax_eval, ax_loss, ax_h):  # one step axis for all three
        ax.set_xlim(-0.03 * last - gap / 6, 1.03 * last + gap / 6)
    save_figure(fig, png, title)
    return fig


def preemption_signal() -> int:
    """The signal a scheduler sends before preempting or timing out a job: submitit's (SIGUSR2
    unless ``SUBMITIT_PREEMPT_SIGNAL`` names another, e.g. ``USR1``)."""
    import os
    import signal

    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    if not hasattr(signal, name):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={os.environ['SUBMITIT_PREEMPT_SIGNAL']!r} is not a signal name")
    return getattr(signal, name)


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


class Preemption:
    """Checkpoint at the next step boundary when the run is asked to stop, then stop.

    Three signals ask: the scheduler's preemption / time-limit signal (submitit's, SIGUSR2 by
    default), Ctrl-C (SIGINT) and SIGTERM (``kill``, a container or job being stopped). While
    active, a signal only sets ``requested``; the training loop polls it once per step, writes a
    checkpoint of that step and calls ``stop(step)``, so a signal never interrupts a step half-done
    and the same command resumes from exactly that step (``resume_point``). On the preemption
    signal, ``stop`` then hands over to whoever handled it before (submitit: requeue the job and
    exit); outside submitit, and for SIGINT / SIGTERM, it exits with a message saying how to
    resume. A second SIGINT or SIGTERM stops at once, without a checkpoint.

    A context manager around the training loop. Leaving it restores SIGINT and SIGTERM; leaving it
    by an exception restores the preemption signal too, while leaving it normally keeps ignoring
    that one (logged): the run is then finishing, and a requeue would only find a finished folder.
    """

    def __init__(self) -> None:
        import signal

        self.signum = preemption_signal()
        self.signals = [self.signum] + [s for s in (signal.SIGINT, signal.SIGTERM) if s != self.signum]
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._finishing = False

    def __enter__(self) -> "Preemption":
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for s in self.signals:
            previous = signal.getsignal(s)
            if previous is not signal.SIG_IGN:  # an ignored signal stays ignored
                self._previous[s] = previous
                signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        import signal

        if self._finishing:
            print(f"{signal_name(signum)} received while finishing the run: ignored", flush=True)
            self.requested = True
            return
        if self.requested and signum != self.signum:  # asked twice: stop now, as the signal would
            self._restore([signum])
            print(f"{signal_name(signum)} again: stopping without a checkpoint", flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.requested, self.received = True, self.received or signum
        if signum != self.signum:
            print(f"{signal_name(signum)} received: checkpointing at the end of this step "
                  f"({signal_name(signum)} again stops at once, without one)", flush=True)

    def _restore(self, signals=None) -> None:
        import signal

        for s in list(signals if signals is not None else self._previous):
            if s in self._previous:
                previous = self._previous.pop(s)
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)

    def checkpoint(self, step: int, total: int, every: int, save, path: Path) -> None:
        """End of training step ``step`` of ``total``: call ``save()`` (which writes ``path``) every
        ``every`` steps (0: never; the last step is left to the run's finish) and at once when a
        stop was asked for, then stop (:meth:`stop`)."""
        if step < total and ((every and step % every == 0) or self.requested):
            save()
            if self.requested:
                self.stop(step, path)

    def stop(self, step: int, checkpoint: Path) -> None:
        """Hand over after ``checkpoint`` (of ``step``) was written: never returns."""
        signum = self.received or self.signum
        name = signal_name(signum)
        why = "preemption or time limit" if signum == self.signum else "asked to stop"
        print(f"step {step}: {name} received ({why}): checkpoint {checkpoint} written", flush=True)
        previous = self._previous.get(self.signum)
        self._restore()
        if signum == self.signum and callable(previous):  # submitit's handler: dumps the job, requeues it, exits
            previous(self.signum, None)
        raise SystemExit(f"stopped at step {step} on {name}; run the same command again to resume from {checkpoint}")

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is None:
            self._finishing = True
            self._restore([s for s in self.signals if s != self.signum])
        else:
            self._restore()
        return False


KILL_ENV = "MASKMTL_KILL_AT_STEP"
PREEMPT_ENV = "MASKMTL_PREEMPT_AT_STEP"
TERM_ENV = "MASKMTL_TERM_AT_STEP"


def kill_point(point: int | str) -> None:
    """Fault injection for the kill-and-resume tests: when the environment variable
    ``MASKMTL_KILL_AT_STEP`` equals ``point`` (a training step, or a named point such as
    ``eval:250``, ``final_eval`` or ``results``), the process kills itself with SIGKILL (no cleanup,
    no final checkpoint), exactly like a job killed by the OS or the scheduler. When
    ``MASKMTL_PREEMPT_AT_STEP`` equals it, the process sends itself the preemption signal, as SLURM
    does before a time limit; ``MASKMTL_TERM_AT_STEP``, SIGTERM (``kill``, a stopped container)."""
    import os
    import signal

    if os.environ.get(KILL_ENV) == str(point):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PREEMPT_ENV) == str(point):
        os.kill(os.getpid(), preemption_signal())
    if os.environ.get(TERM_ENV) == str(point):
        os.kill(os.getpid(), signal.SIGTERM)


def plot_masks(masks, png: Path, title: str, seed: int = 0) -> None:
    """Mask density per target and task (heatmap) and a t-SNE of the tasks' masks (Jaccard
    distances between the flattened masks; papers' Fig. 5 / 7a). The t-SNE needs >= 4 tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names = masks.tasks, masks.names
    rows = [masks.for_task(t) for t in range(len(tasks))]
    dens = np.array([[float(r[n].float().mean()) for n in names] for r in rows])  # (N, targets)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    im = axes[0].imshow(dens.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[0].set_yticks(range(len(names)), [n if len(n) < 40 else "…" + n[-38:] for n in names], fontsize=6)
    axes[0].set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
    axes[0].set_title("mask density per target and task")
    fig.colorbar(im, ax=axes[0], fraction=0.03)
    if len(tasks) >= 4:
        from sklearn.manifold import TSNE

        flat = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in rows]).float()  # (N, |θ|)
        inter = flat @ flat.T
        union = flat.sum(1)[:, None] + flat.sum(1)[None] - inter
        dist = (1 - inter / union.clamp_min(1)).numpy().astype(np.float64)
        np.fill_diagonal(dist, 0.0)
        xy = TSNE(n_components=2, metric="precomputed", init="random", random_state=seed,
                  perplexity=min(5.0, len(tasks) - 1.0)).fit_transform(dist)
        groups = np.array([masks.group_of(t) for t in range(len(tasks))])
        axes[1].scatter(xy[:, 0], xy[:, 1], c=groups, cmap="tab10", s=30)
        for (x, y), name in zip(xy, tasks):
            axes[1].annotate(name.removesuffix("-v3"), (x, y), fontsize=6)
        axes[1].set_title("t-SNE of task masks (Jaccard distance), colour = group")
    else:
        axes[1].text(0.5, 0.5, "t-SNE needs at least 4 tasks", ha="center", va="center")
        axes[1].set_axis_off()
    save_figure(fig, png, title)


# ---------------------------------------------------------------------------------- mask diagnostics
# What the mask updates did (MaskUpdater's diagnostics, maskmtl/update.py) and what the masks do (the
# held-out loss under each task's own, initial and neighbour's mask): one figure and one summary.
DIAGNOSTIC_KEYS = {
    "changed since initialisation (share of active entries)": ["mask/changed_since_init_share"],
    "drops / recoveries with a zero gradient estimate (share)": ["mask/drop_zero_grad_share",
                                                                  "mask/recover_zero_grad_share"],
    "active entries where agreement decides, |A| > λ·I (share)": ["mask/agreement_dominates_share"],
    "overlap of drop sets (Jaccard)": ["mask/drop_jaccard_groups", "mask/drop_jaccard_consecutive"],
    "held-out loss under each mask": ["eval/heldout_mse", "eval/heldout_mse_init", "eval/heldout_mse_neighbour"],
}


def diagnostics_summary(metrics_path: Path) -> dict | None:
    """``results.json``'s ``mask_diagnostics``: the number of mask updates, and per diagnostic key its
    value at the last update (evaluation, for the held-out losses) and its mean over them. ``None``
    when the run made no mask update."""
    from maskmtl.outputs import read_metrics

    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    updates = [r for r in rows if "mask/swapped" in r]
    if not updates:
        return None
    out: dict[str, Any] = {"updates": len(updates), "steps": [int(r["step"]) for r in updates]}
    for key in (k for keys in DIAGNOSTIC_KEYS.values() for k in keys):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
        if vals:
            out[key] = {"last": vals[-1], "mean": float(np.mean(vals))}
    return out


def plot_diagnostics(metrics_path: Path, png: Path, title: str) -> bool:
    """``diagnostics.png``: each group of ``DIAGNOSTIC_KEYS`` over training, one panel per group.
    Written only when the run made mask updates; returns whether it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskmtl.outputs import read_metrics

    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if not any("mask/swapped" in r for r in rows):
        return False
    fig, axes = plt.subplots(1, len(DIAGNOSTIC_KEYS), figsize=(4.2 * len(DIAGNOSTIC_KEYS), 3.8))
    for ax, (name, keys) in zip(axes, DIAGNOSTIC_KEYS.items()):
        drawn = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=key.split("/", 1)[1])
                drawn = True
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save_figure(fig, png, title)
    return True
