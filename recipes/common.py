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
                device=None) -> tuple[int, dict, Path | None]:
    """Resume from ``out``'s checkpoint when it has one: model, masks, optimizer and torch
    generators are loaded, the numpy generators (saved under ``extra["numpy_rngs"]``) restored in
    place. Returns ``(step, extra, checkpoint)``; ``(0, {}, None)`` for a fresh run."""
    from maskmtl import load_checkpoint

    ckpt = resume_point(out)
    if ckpt is None:
        return 0, {}, None
    state = load_checkpoint(ckpt, model=model, masks=masks, optimizer=optimizer, generators=generators,
                            map_location=device)
    for k, r in (numpy_rngs or {}).items():
        r.bit_generator.state = state["extra"]["numpy_rngs"][k]
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
    check_train_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = choose_device(cfg.device)
    seed_everything(cfg.seed)
    return t_start, device, run_dir()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_generator(seed: int, offset: int) -> torch.Generator:
    """An explicit CPU generator for one random stream (data, masks, task order …)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + offset)


TASK_SAMPLING = ("round_robin", "uniform")


def check_train_config(cfg: DictConfig) -> None:
    """Validate the shared ``train.*`` keys before anything is built."""
    from maskmtl.config import require

    is_int = lambda lo: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo)  # noqa: E731
    require(cfg, "train.steps", is_int(1), "an integer >= 1")
    require(cfg, "train.batch_size", is_int(1), "an integer >= 1")
    require(cfg, "train.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
    require(cfg, "train.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
    require(cfg, "train.task_sampling", lambda v: v in TASK_SAMPLING, f"one of {TASK_SAMPLING}")
    require(cfg, "train.log_every", is_int(1), "an integer >= 1")
    for key in ("train.eval_every", "train.checkpoint_every"):
        require(cfg, key, is_int(0), "an integer >= 0 (0: never)")
    clip = cfg.train.grad_clip
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        from maskmtl.config import ConfigError

        raise ConfigError(f"train.grad_clip={clip!r}: expected null or a number > 0")
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


def multi_task_step(cfg: DictConfig, model: torch.nn.Module, masking, n_tasks: int) -> MultiTaskStep | None:
    """``None`` for ``train.gradient=plain``, else the step builder (checks the masks are dense)."""
    from maskmtl.config import ConfigError
    from maskmtl.surgery import GradientSurgery

    check_gradient_config(cfg)
    kind = cfg.train.gradient
    if kind == "plain":
        return None
    k = n_tasks if cfg.train.tasks_per_step is None else int(cfg.train.tasks_per_step)
    if k > n_tasks:
        raise ConfigError(f"train.tasks_per_step={k}: expected at most the number of tasks ({n_tasks})")
    if kind in ("pcgrad", "cagrad") and n_tasks < 2:
        raise ConfigError(f"train.gradient={kind}: needs at least 2 tasks, the data has {n_tasks}")
    updates = masking.updater.every > 0 and masking.scheduler.max_alpha() > 0
    if not bool((masking.masks.density() == 1.0).all()) or updates:
        raise ConfigError(f"train.gradient={kind}: combines dense per-task gradients into one dense step, so it "
                          f"needs all-ones masks that never change (initializer=dense scheduler=frozen, as "
                          f"method=mtdt_mean|pcgrad|cagrad set)")
    gen = make_generator(cfg.seed, 5) if kind == "pcgrad" else None
    surgery = GradientSurgery(list(model.parameters()), kind, c=float(cfg.train.cagrad_c), reduction="mean",
                              generator=gen)
    return MultiTaskStep(surgery, n_tasks, k, cfg.train.task_sampling)


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
                  steps: int, wall_time_s: float, extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``results.json`` (output contract) and return it."""
    means = {}
    for metric in next(iter(per_task.values())):
        means[metric] = float(np.mean([v[metric] for v in per_task.values()]))
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


class training_progress:
    """Rich progress bar over training steps with loss and steps/s; on a non-terminal (CI, log
    files) it prints a plain line at every 10 % instead of redrawing."""

    def __init__(self, total: int, start: int = 0, description: str = "train"):
        from rich.console import Console

        self.total, self.done, self.description = total, start, description
        self.console = Console()
        self.live = self.console.is_terminal
        self._t0 = None

    def __enter__(self):
        import time

        self._t0, self._start = time.perf_counter(), self.done
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:.1f} steps/s  loss {task.fields[loss]:.4f}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done, rate=0.0, loss=0.0)
        return self

    def advance(self, loss: float) -> None:
        import time

        self.done += 1
        rate = (self.done - self._start) / max(time.perf_counter() - self._t0, 1e-9)
        if self.live:
            self._bar.update(self._task, advance=1, rate=rate, loss=loss)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            self.console.print(f"{self.description}: step {self.done}/{self.total}  {rate:.1f} steps/s  loss {loss:.4f}")

    def __exit__(self, *exc):
        if self.live:
            self._bar.__exit__(*exc)
        return False


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


def plot_curves(metrics_path: Path, png: Path, title: str) -> None:
    """Plot every ``eval/…`` per-task curve, the mean, and ``mask/harmony`` vs step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskmtl.outputs import read_metrics

    rows = read_metrics(metrics_path)
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.startswith("eval/mean")})
    mean_keys = sorted({k for r in rows for k in r if k.startswith("eval/mean")})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for keys, style in ((eval_keys, dict(alpha=0.4, lw=1)), (mean_keys, dict(color="k", lw=2))):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
            if pts:
                axes[0].plot(*zip(*pts), label=k.removeprefix("eval/"), **style)
    axes[0].set(xlabel="step", ylabel="evaluation metric", title="evaluation")
    axes[0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
    pts = [(r["step"], r["mask/harmony"]) for r in rows if r.get("mask/harmony") is not None]
    if pts:
        axes[1].plot(*zip(*pts), marker="o")
    axes[1].set(xlabel="step", ylabel="harmony (Def. 3.2)", title="harmony at mask updates")
    save_figure(fig, png, title)


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
