"""Digits recipe: the maskmtl core on a non-RL multi-task classifier, top to bottom.

    python tools/run.py recipe=digits                      # learned masks (ERK + Fisher)
    python tools/run.py recipe=digits variant=dense        # dense multi-task baseline
    python tools/run.py recipe=digits variant=frozen       # fixed random ERK masks
    python tools/run.py recipe=digits grouper=knn grouper.n_groups=2   # grouped masks
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from maskmtl import MaskedAdamW, group_tasks, save_checkpoint, save_masks
from maskmtl.config import ConfigError, Masking, check_keys, is_bool, is_int, is_number
from maskmtl.outputs import CHECKPOINT, MASKS, METRICS, MetricsLog
from maskmtl.structures import print_structure_report
from maskmtl.targets import print_target_report, target_report_rows
from maskmtl.update import check_schedule
from recipes.common import (Preemption, chosen_options, evaluation, kill_point, make_generator, next_task, phase,
                            plot_curves, plot_masks, print_table, restore_run, start_run, training_progress,
                            write_results)
from recipes.digits.task import DigitsTasks, MultiTaskMLP


def loss_fn(forward, task: int, batch) -> torch.Tensor:
    x, y = batch
    logits = forward(x, torch.full((x.shape[0],), task, dtype=torch.long, device=x.device))
    return F.cross_entropy(logits, y)


def example_inputs(data: DigitsTasks, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [2, 64], task [2]): what the model is traced with for structured masks and export."""
    return data.x_train[:2].to(device), torch.zeros(2, dtype=torch.long, device=device)


def export_setup(cfg: DictConfig, state: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """For ``tools/export.py``: the full model (weights from ``state``), example inputs, and the
    config that builds the same full model again."""
    model_config = {"n_in": 64, "n_tasks": len(cfg.tasks), "hidden": int(cfg.model.hidden),
                    "depth": int(cfg.model.depth), "task_input": bool(cfg.model.task_input)}
    model = MultiTaskMLP(**model_config)
    model.load_state_dict(state)
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    return model, (x, torch.arange(4) % len(cfg.tasks)), model_config


@torch.no_grad()
def evaluate(masking: Masking, data: DigitsTasks, device) -> dict[str, dict[str, float]]:
    """Test accuracy and loss per task, each task under its own group's mask (dropout off)."""
    model = masking.model.model
    was_training = model.training
    model.eval()
    out = {}
    x = data.x_test.to(device)
    for i, task in enumerate(data.tasks):
        y = data.y_test[i].to(device)
        logits = masking.model(i, x, torch.full((x.shape[0],), i, dtype=torch.long, device=device))
        out[task] = {"accuracy": float((logits.argmax(-1) == y).float().mean()),
                     "loss": float(F.cross_entropy(logits, y))}
    model.train(was_training)
    return out


def smoke_overrides(cfg: DictConfig) -> dict:
    """``debug=smoke``: a 64-unit model (and, not a key, only the first 300 images)."""
    return {"model.hidden": 64}


def check_config(cfg: DictConfig) -> None:
    """The digits keys, before anything is built (recipes/launch.py calls it)."""
    import numpy as np

    from recipes.digits.task import relabel

    tasks = cfg.tasks
    names = "digit, reverse, parity, large or shift1..shift9"
    if isinstance(tasks, str) or not tasks or len(set(map(str, tasks))) != len(tasks):
        raise ConfigError(f"tasks={tasks!r}: expected a non-empty list of distinct task names ({names})")
    for t in tasks:
        try:
            relabel(str(t), np.arange(10))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    check_keys(cfg, [
        ("data.test_fraction", is_number(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
        ("model.hidden", is_int(1), "an integer >= 1"),
        ("model.depth", is_int(1), "an integer >= 1"),
        ("model.dropout", is_number(0, 1, hi_open=True), "a number in [0, 1)"),
        ("model.task_input", is_bool, "true or false"),
    ])


def run(cfg: DictConfig) -> dict | None:
    # ------------------------------------------------------------------ build
    t_start, device, out = start_run(cfg)
    tasks = list(cfg.tasks)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    data = DigitsTasks(tasks, cfg.data.test_fraction, cfg.seed, limit=300 if cfg.smoke else None)  # smoke: 300 images
    model = MultiTaskMLP(64, len(tasks), cfg.model.hidden, cfg.model.depth,
                         dropout=cfg.model.dropout, task_input=cfg.model.task_input).to(device)
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1), example_inputs=example_inputs(data, device))
    masks = masking.masks
    print_target_report(target_report_rows(model, masking.targets, masks.as_dict()))
    if masking.structures is not None:
        print_structure_report(masking.structures)
    if cfg.dry_run:
        return None
    steps = int(cfg.train.steps)
    warmup = int(cfg.grouping.warmup_steps) if masking.needs_grouping else 0
    if masking.needs_grouping and not 0 < warmup < steps:
        raise ConfigError(f"grouping.warmup_steps={warmup}: expected 0 < warmup < train.steps={steps}")
    optimizer = MaskedAdamW(model.named_parameters(), masks, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    gens = {"data": make_generator(cfg.seed, 2), "tasks": make_generator(cfg.seed, 3),
            "scores": make_generator(cfg.seed, 4)}
    start, extra, ckpt = restore_run(out, model=model, masks=masks, optimizer=optimizer, generators=gens,
                                     device=device, updater=masking.updater)
    wall_before = extra.get("wall_time_s", 0.0)
    log = MetricsLog(out / METRICS, resume_step=start)  # start: the checkpoint's step, 0 for a fresh start

    def to_dev(batch):
        return tuple(t.to(device) for t in batch)

    def score_batches(task: int):
        return [to_dev(data.batch(task, cfg.train.batch_size, gens["scores"])) for _ in range(cfg.masking.grad_batches)]

    # ------------------------------------------------------------------ train
    model.train()
    with training_progress(steps, start) as progress, Preemption() as preemption:
        for step in range(start + 1, steps + 1):
            task = next_task(step, len(tasks), cfg.train.task_sampling, gens["tasks"])
            group = masks.group_of(task)
            batch = to_dev(data.batch(task, cfg.train.batch_size, gens["data"]))
            loss = loss_fn(masking.model.bind(task), task, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step(group=group)
            metrics = {}

            # -------------------------------------------------- grouping (G-HarmoDT stage 2)
            if masking.needs_grouping and step == warmup:
                with phase(f"grouping at step {step}", detail=f"{len(tasks)} tasks"):
                    g = group_tasks(model, masks, masking.scorer, masking.grouper, loss_fn, score_batches,
                                    masking.group_density(), cfg.seed, cfg.masking.recovery_gradient,
                                    structures=masking.structures)
                check_schedule(masking.scheduler, masks, structures=masking.structures)
                masking.updater.track(masks)  # the group masks are the initial masks of the updates that follow
                print(f"step {step}: grouped tasks {dict(zip(tasks, g['task_to_group']))}")
                metrics.update({"mask/harmony": g["harmony"], "mask/groups": float(masks.n_groups)})

            # -------------------------------------------------- mask update (Algorithm 2 / 5)
            elif step > warmup and masking.updater.due(step):
                metrics.update(progress.mask_update(step, masking.updater.update(step, model, masks, loss_fn,
                                                                                 score_batches, optimizer)))

            if step % cfg.train.log_every == 0:
                metrics.update({"train/loss": loss.item(), "train/task": float(task)})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                with evaluation(f"evaluation at step {step}", len(tasks)) as shown:
                    ev = evaluate(masking, data, device)
                    metrics.update({f"eval/{t}/accuracy": v["accuracy"] for t, v in ev.items()})
                    metrics["eval/mean_accuracy"] = sum(v["accuracy"] for v in ev.values()) / len(ev)
                    shown.result = f"mean accuracy {metrics['eval/mean_accuracy']:.4f}"
            if metrics:
                log.log(step, metrics)
            preemption.checkpoint(step, steps, cfg.train.checkpoint_every, lambda: save_checkpoint(
                out / CHECKPOINT, step=step, model=model, masks=masks, optimizer=optimizer, generators=gens,
                extra={"wall_time_s": wall_before + time.perf_counter() - t_start,
                       "updater": masking.updater.state_dict()}), out / CHECKPOINT)
            progress.advance(loss=loss.item())
            kill_point(step)

    # ------------------------------------------------------------------ finish
    log.close()
    with evaluation(f"final evaluation after {steps} steps", len(tasks)) as shown:
        final = evaluate(masking, data, device)
        shown.result = f"mean accuracy {sum(v['accuracy'] for v in final.values()) / len(final):.4f}"
    save_masks(masks, out / MASKS)
    wall = wall_before + time.perf_counter() - t_start
    save_checkpoint(out / CHECKPOINT, step=steps, model=model, masks=masks, optimizer=optimizer, generators=gens,
                    extra={"wall_time_s": wall, "updater": masking.updater.state_dict()})
    print_table(f"digits: test metrics after {steps} steps", final)
    # figures first: results.json marks the run finished, so a kill before it leaves a run that resumes
    plot_curves(out / METRICS, out / "curves.png",
                title=f"digits ({', '.join(f'{k}={v}' for k, v in chosen_options(cfg).items() if k != 'recipe')})")
    plot_masks(masks, out / "masks.png", title=f"digits seed {cfg.seed}", seed=cfg.seed)
    results = write_results(
        out, cfg, tasks=tasks, per_task=final, headline="accuracy", steps=steps, wall_time_s=wall,
        extra={"task_to_group": masks.task_to_group, "density": masks.density().tolist(),
               "resumed_from": start if ckpt is not None else None},
    )
    print(f"results: {out / 'results.json'}")
    return results
