"""The training loop every recipe shares, and the typed ``train.*`` settings it reads.

A recipe builds its model, data and masks, hands the loop what differs (the loss, a batch of a
task, an evaluation, a stage at a given step), and reads what it needs back::

    loop = TrainLoop(ctx, train, model=model, masking=masking, loss_fn=loss_fn, batch_for=batch_for,
                     score_batches=score_batches, generators=gens, evaluate=evaluate_at)
    loop.restore()             # resume from the run folder's checkpoint, if it has one
    loop.train()               # steps, mask updates, logging, evaluations, checkpoints
    ...                        # the recipe's final evaluation
    loop.finish(per_task=..., headline="success", extra=..., title=...)   # masks, figures, results.json

What one step does, in order: the learning rate of ``TrainSpec.lr_at(step)``; the step's task
(``next_task``) and its masked forward/backward (or, with ``multi``, a batch from each of several
tasks combined into one dense gradient); gradient clipping; ``MaskedAdamW.step`` on the task's
group; at ``grouping_at`` the tasks are grouped (``group_tasks``; G-HarmoDT), after it the mask
update when one is due (Algorithm 2 / 5); the recipe's ``on_step`` hook; the training metrics every
``log_every`` steps; the recipe's evaluation every ``eval_every`` steps, kept as the best-so-far
when its score is the highest; the checkpoint every ``checkpoint_every`` steps or when the run is
asked to stop (``Preemption``); the kill point of the kill-and-resume tests.

After the last step ``train`` saves the trained state with the metrics log's row count, so a run
stopped anywhere later (final evaluation, figures, results) resumes there with its log cut back.
``results.json`` is written last: it marks the run finished.

Nothing here knows a benchmark: the recipe's ``evaluate`` returns its metrics and one score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from maskmtl import MaskedAdamW, check_schedule, group_tasks, save_checkpoint, save_masks
from maskmtl.outputs import CHECKPOINT, MASKS, METRICS
from recipes.loggers import RunLog, open_sinks
from recipes.common import (Preemption, diagnostics_summary, kill_point, metrics_rows, next_task, phase, plot_curves,
                            plot_diagnostics, plot_masks, print_table, restore_run, start_run, training_progress,
                            write_results)


@dataclass(frozen=True)
class TrainSpec:
    """The ``train.*`` keys (conf/config.yaml, the recipes' files), read once and checked before
    (``recipes.common.check_train_config``)."""

    steps: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float | None
    warmup_steps: int
    task_sampling: str
    log_every: int
    eval_every: int
    checkpoint_every: int
    gradient: str = "plain"             # harmodt: plain | mean | pcgrad | cagrad
    tasks_per_step: int | None = None
    cagrad_c: float = 0.4
    optimizer_impl: str = "reference"   # MaskedAdamW's update: reference | compiled (maskmtl.apply)

    @classmethod
    def from_config(cls, train: DictConfig) -> "TrainSpec":
        t = OmegaConf.to_container(train, resolve=True)
        return cls(steps=int(t["steps"]), batch_size=int(t["batch_size"]), lr=t["lr"], betas=tuple(t["betas"]),
                   weight_decay=t["weight_decay"], grad_clip=t.get("grad_clip"),
                   warmup_steps=int(t.get("warmup_steps", 0)), task_sampling=t["task_sampling"],
                   log_every=int(t["log_every"]), eval_every=int(t["eval_every"]),
                   checkpoint_every=int(t["checkpoint_every"]), gradient=t.get("gradient", "plain"),
                   tasks_per_step=t.get("tasks_per_step"), cagrad_c=t.get("cagrad_c", 0.4),
                   optimizer_impl=t.get("optimizer_impl", "reference"))

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant ``lr`` (spec §8; constant without warm-up)."""
        return self.lr * min(1.0, step / max(1, self.warmup_steps))


@dataclass(frozen=True)
class RunContext:
    """Where and how a run runs: its folder, device, seed, and the clock of this attempt."""

    out: Path
    device: torch.device
    seed: int
    t_start: float
    dry_run: bool = False
    logger: Mapping[str, Any] | None = None  # the ``logger`` node: sinks beside metrics.jsonl (recipes.loggers)
    config: Mapping[str, Any] | None = None  # the resolved config, for a sink that records it (W&B)

    @classmethod
    def start(cls, cfg: DictConfig) -> "RunContext":
        """``start_run`` (train.* checked, threads, device, global seeds) and the values the loop uses."""
        t_start, device, out = start_run(cfg)
        logger = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") is not None else None
        return cls(out=out, device=device, seed=int(cfg.seed), t_start=t_start, dry_run=bool(cfg.dry_run),
                   logger=logger, config=OmegaConf.to_container(cfg, resolve=True))


def masked_optimizer(model: torch.nn.Module, masks, spec: TrainSpec) -> MaskedAdamW:
    """The recipes' optimizer: AdamW whose step on a group touches only that group's mask."""
    return MaskedAdamW(model.named_parameters(), masks, lr=spec.lr, betas=tuple(spec.betas),
                       weight_decay=spec.weight_decay, impl=spec.optimizer_impl)


@dataclass
class Evaluation:
    """What a recipe's evaluation returns: the metrics to log, the score the best-so-far compares
    (``None``: no best kept) and the per-task results stored with the best."""

    metrics: dict
    score: float | None = None
    per_task: Mapping[str, Any] | None = None


class TrainLoop:
    """The shared loop (module docstring). Arguments beyond the model and masks:

    loss_fn: ``loss_fn(forward, task, batch)`` (``maskmtl.LossFn``).
    batch_for: ``batch_for(task)``: one training batch of ``task`` (the recipe binds its generator).
    score_batches: ``score_batches(task)``: the batches a mask update (or the grouping) averages over.
    generators: torch generators checkpointed with the run; ``generators["tasks"]`` picks the tasks.
    numpy_rngs: numpy generators checkpointed with the run (``extra["numpy_rngs"]``).
    multi: a ``recipes.common.MultiTaskStep`` (``train.gradient=mean|pcgrad|cagrad``) or None.
    dense_until: steps ``<= dense_until`` train dense θ without masks (G-HarmoDT's warm-up).
    grouping_at: the step at which the tasks are grouped (0: never); mask updates start after it.
    on_grouped: ``on_grouped(step, grouping)``: what the recipe records of a grouping (files).
    on_step: ``on_step(step, metrics)``: more work at the end of each step (a gate trained alongside).
    train_info: ``train_info(step, task)``: the logged training keys beside ``train/loss``
        (default: ``train/lr``).
    evaluate: ``evaluate(step) -> Evaluation``: an evaluation during training (every ``eval_every``).
    evaluate_last_step: evaluate at the last step inside the loop too (a recipe whose final
        evaluation is not logged).
    best_key: the best-so-far's score key (``{"step", best_key, "per_task"}``).
    extra_state: ``extra_state()``: more of the recipe's state for each checkpoint (a gate).
    """

    def __init__(self, ctx: RunContext, spec: TrainSpec, *, model: torch.nn.Module, masking, loss_fn: Callable,
                 batch_for: Callable, score_batches: Callable, generators: dict, numpy_rngs: dict | None = None,
                 multi=None, dense_until: int = 0, grouping_at: int = 0,
                 on_grouped: Callable | None = None, on_step: Callable | None = None,
                 train_info: Callable | None = None, evaluate: Callable | None = None,
                 evaluate_last_step: bool = False, best_key: str = "mean_success",
                 extra_state: Callable | None = None):
        self.ctx, self.spec, self.model, self.masking = ctx, spec, model, masking
        self.masks = masking.masks
        self.optimizer = masked_optimizer(model, self.masks, spec)
        self.loss_fn, self.batch_for, self.score_batches = loss_fn, batch_for, score_batches
        self.generators, self.numpy_rngs, self.multi = generators, numpy_rngs, multi
        self.dense_until, self.grouping_at = int(dense_until), int(grouping_at)
        self.on_grouped, self.on_step, self.evaluate = on_grouped, on_step, evaluate
        self.train_info = train_info or (lambda step, task: {"train/lr": self.spec.lr_at(step)})
        self.evaluate_last_step, self.best_key, self._extra_state = evaluate_last_step, best_key, extra_state
        self.n_tasks = self.masks.n_tasks
        self.start, self.extra, self.checkpoint_path = 0, {}, None
        self.wall_before, self.best = 0.0, None
        self._sinks: list | None = None

    # ------------------------------------------------------------------ state
    @property
    def out(self) -> Path:
        return self.ctx.out

    def restore(self) -> int:
        """Resume from the run folder's checkpoint when it has one; returns the step to start after."""
        self.out.mkdir(parents=True, exist_ok=True)  # Hydra made it already; a loop used without Hydra may not have
        self.start, self.extra, self.checkpoint_path = restore_run(
            self.out, model=self.model, masks=self.masks, optimizer=self.optimizer, generators=self.generators,
            numpy_rngs=self.numpy_rngs, device=self.ctx.device, updater=self.masking.updater)
        self.wall_before, self.best = self.extra.get("wall_time_s", 0.0), self.extra.get("best")
        return self.start

    @property
    def resumed_from(self) -> int | None:
        """The step this attempt resumed from (``None``: a fresh start), for ``results.json``."""
        return self.start if self.checkpoint_path is not None else None

    def wall_time(self) -> float:
        """Seconds of every attempt of this run so far."""
        return self.wall_before + time.perf_counter() - self.ctx.t_start

    def state(self) -> dict:
        """The checkpoint's ``extra``: wall time, best-so-far (when the recipe keeps one), the mask
        updater's diagnostics, the numpy generators, and the recipe's own state."""
        out = {"wall_time_s": self.wall_time()}
        if self.evaluate is not None and self.best_key:
            out["best"] = self.best
        out["updater"] = self.masking.updater.state_dict()
        if self.numpy_rngs is not None:
            out["numpy_rngs"] = {k: r.bit_generator.state for k, r in self.numpy_rngs.items()}
        if self._extra_state is not None:
            out.update(self._extra_state())
        return out

    def save(self, step: int, **more) -> None:
        save_checkpoint(self.out / CHECKPOINT, step=step, model=self.model, masks=self.masks,
                        optimizer=self.optimizer, generators=self.generators, extra=self.state() | more)

    def keep_best(self, step: int, score: float, per_task) -> None:
        """Keep (step, score, per-task results) when ``score`` beats the best so far."""
        if self.best is None or score > self.best[self.best_key]:
            self.best = {"step": step, self.best_key: score, "per_task": per_task}

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> tuple[torch.Tensor, int | None]:
        """The optimizer step of ``step``: returns the loss and the task (None: several tasks)."""
        masking, masks, optimizer, spec = self.masking, self.masks, self.optimizer, self.spec
        for pg in optimizer.param_groups:
            pg["lr"] = spec.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        if self.multi is None:  # train.gradient=plain: one task's batch per step
            task = next_task(step, self.n_tasks, spec.task_sampling, self.generators["tasks"])
            dense = step <= self.dense_until  # warm-up of G-HarmoDT: dense θ, no masks
            loss = self.loss_fn(masking.model.bind(None if dense else task), task, self.batch_for(task))
            loss.backward()
            group = None if dense else masks.group_of(task)
        else:  # a batch from each of the step's tasks, their gradients combined into .grad (mean, PCGrad, CAGrad)
            task, group = None, None  # a dense step (the masks are all-ones)
            loss = self.multi.backward(step, self.generators["tasks"],
                                       lambda t: self.loss_fn(masking.model.bind(t), t, self.batch_for(t)))
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
        optimizer.step(group=group)
        return loss, task

    def group(self, step: int) -> dict:
        """Group the tasks now (G-HarmoDT stage 2, Algorithm 4): group masks from the tasks' summed
        scores at the initializer's density; later updates start from them. Returns the metrics."""
        masking, masks = self.masking, self.masks
        tasks = masks.tasks
        with phase(f"grouping at step {step}", detail=f"{len(tasks)} tasks"):
            g = group_tasks(self.model, masks, masking.scorer, masking.grouper, self.loss_fn, self.score_batches,
                            masking.group_density(), self.ctx.seed, masking.updater.recovery_gradient,
                            structures=masking.structures)
        check_schedule(masking.scheduler, masks, structures=masking.structures)
        masking.updater.track(masks)  # the group masks are the initial masks of the updates that follow
        if self.on_grouped is not None:
            self.on_grouped(step, g)
        print(f"step {step}: grouped tasks {dict(zip(tasks, g['task_to_group']))}")
        return {"mask/harmony": g["harmony"], "mask/groups": float(masks.n_groups)}

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Steps ``start + 1 .. steps``, then the checkpoint of the trained state."""
        spec, masking = self.spec, self.masking
        log = self.run_log(resume_step=self.start)  # the checkpoint's step, 0 for a fresh start
        self.model.train()
        with training_progress(spec.steps, self.start) as progress, Preemption() as preemption:
            for step in range(self.start + 1, spec.steps + 1):
                loss, task = self.step(step)
                metrics = {}
                if step == self.grouping_at:  # 0 (no grouping) is never a step
                    metrics.update(self.group(step))
                elif step > self.grouping_at and masking.updater.due(step):  # Algorithm 2 / 5
                    metrics.update(progress.mask_update(step, masking.updater.update(
                        step, self.model, self.masks, self.loss_fn, self.score_batches, self.optimizer)))
                if self.on_step is not None:
                    self.on_step(step, metrics)
                if step % spec.log_every == 0:
                    metrics.update({"train/loss": loss.item(), **self.train_info(step, task),
                                    **(self.multi.surgery.last if self.multi else {})})
                if (self.evaluate is not None and spec.eval_every and step % spec.eval_every == 0
                        and (step < spec.steps or self.evaluate_last_step)):
                    result = self.evaluate(step)
                    kill_point(f"eval:{step}")
                    metrics.update(result.metrics)
                    if result.score is not None and self.best_key:
                        self.keep_best(step, result.score, result.per_task)
                if metrics:
                    log.log(step, metrics)
                preemption.checkpoint(step, spec.steps, spec.checkpoint_every, lambda: self.save(step),
                                      self.out / CHECKPOINT)
                progress.advance(loss=loss.item())
                kill_point(step)
        log.close()
        # the trained state first: a run stopped from here on resumes after training, its log cut back
        self.save(spec.steps, metrics_rows=metrics_rows(self.out / METRICS))
        kill_point("final_eval")

    # ------------------------------------------------------------------ the end
    def run_log(self, resume_step: int | None = None) -> RunLog:
        """``metrics.jsonl`` with the sinks of ``logger=`` (opened at the first call, kept for the run)."""
        if self._sinks is None:
            self._sinks = open_sinks(self.out, self.ctx.logger, self.ctx.config)
        return RunLog(self.out, self._sinks, resume_step=resume_step)

    def log(self, step: int, metrics: dict) -> None:
        """Append one row to the metrics log after training (a final evaluation, the gate's steps)."""
        log = self.run_log()
        log.log(step, metrics)
        log.close()

    def finish(self, cfg: DictConfig, *, per_task: Mapping[str, Mapping[str, float]], headline: str, title: str,
               table: str, extra: Mapping[str, Any], reports: tuple[Callable[[], None], ...] = (),
               figures: tuple[Callable[[Path], None], ...] = (),
               means: Mapping[str, float] | None = None) -> dict:
        """Masks, the per-task table titled ``table`` (then each of ``reports()``: more lines), the
        figures titled ``title`` (``curves.png``, ``masks.png``, ``diagnostics.png`` when masks were
        updated, each of ``figures(out)``) and, last, ``results.json`` (``extra`` and the summary of
        the mask diagnostics, ``mask_diagnostics``, beside the per-task results; ``means``: run-level
        metrics added to its ``mean``, beside the per-task means)."""
        out = self.out
        save_masks(self.masks, out / MASKS)
        print_table(table, per_task)
        for report in reports:
            report()
        # figures first: results.json marks the run finished, so a kill before it leaves a run that resumes
        kill_point("figures")
        plot_curves(out / METRICS, out / "curves.png", title=title)
        plot_masks(self.masks, out / "masks.png", title=title, seed=self.ctx.seed)
        plot_diagnostics(out / METRICS, out / "diagnostics.png", title=title)  # runs with mask updates
        for figure in figures:
            figure(out)
        log = self.run_log()  # the figures to the sinks that take images (TensorBoard, W&B)
        log.figures(sorted(out.glob("*.png")), self.spec.steps)
        log.close()
        for sink in self._sinks:
            sink.close()
        kill_point("results")
        extra = dict(extra) | {"mask_diagnostics": diagnostics_summary(out / METRICS)}
        results = write_results(out, cfg, tasks=list(self.masks.tasks), per_task=per_task, headline=headline,
                                steps=self.spec.steps, wall_time_s=self.wall_time(), extra=extra, means=means)
        print(f"results: {out / 'results.json'}")
        return results


def report_masking(model: torch.nn.Module, masking) -> None:
    """The mask-target report (and the structure report of a structured granularity)."""
    from maskmtl.structures import print_structure_report
    from maskmtl.targets import print_target_report, target_report_rows

    print_target_report(target_report_rows(model, masking.targets, masking.masks.as_dict()))
    if masking.structures is not None:
        print_structure_report(masking.structures)
