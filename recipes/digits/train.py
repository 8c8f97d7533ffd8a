"""Digits recipe: the maskmtl core on a non-RL multi-task classifier, top to bottom.

    python tools/run.py recipe=digits                      # learned masks (ERK + Fisher)
    python tools/run.py recipe=digits variant=dense        # dense multi-task baseline
    python tools/run.py recipe=digits variant=frozen       # fixed random ERK masks
    python tools/run.py recipe=digits grouper=knn grouper.n_groups=2   # grouped masks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from maskmtl.config import ConfigError, Masking, check_keys, is_bool, is_int, is_number
from recipes.common import chosen_options, evaluation, make_generator
from recipes.loop import Evaluation, RunContext, TrainLoop, TrainSpec, report_masking
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
    ctx = RunContext.start(cfg)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    train, tasks, device = TrainSpec.from_config(cfg.train), list(cfg.tasks), ctx.device
    data = DigitsTasks(tasks, cfg.data.test_fraction, cfg.seed, limit=300 if cfg.smoke else None)  # smoke: 300 images
    model = MultiTaskMLP(64, len(tasks), cfg.model.hidden, cfg.model.depth,
                         dropout=cfg.model.dropout, task_input=cfg.model.task_input).to(device)
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1), example_inputs=example_inputs(data, device))
    report_masking(model, masking)
    if ctx.dry_run:
        return None
    warmup = int(cfg.grouping.warmup_steps) if masking.needs_grouping else 0
    if masking.needs_grouping and not 0 < warmup < train.steps:
        raise ConfigError(f"grouping.warmup_steps={warmup}: expected 0 < warmup < train.steps={train.steps}")
    gens = {"data": make_generator(cfg.seed, 2), "tasks": make_generator(cfg.seed, 3),
            "scores": make_generator(cfg.seed, 4)}

    def batch(task: int, generator: torch.Generator):
        return tuple(t.to(device) for t in data.batch(task, train.batch_size, generator))

    def evaluate_at(step: int) -> Evaluation:
        with evaluation(f"evaluation at step {step}", len(tasks)) as shown:
            ev = evaluate(masking, data, device)
            metrics = {f"eval/{t}/accuracy": v["accuracy"] for t, v in ev.items()}
            metrics["eval/mean_accuracy"] = sum(v["accuracy"] for v in ev.values()) / len(ev)
            shown.result = f"mean accuracy {metrics['eval/mean_accuracy']:.4f}"
        return Evaluation(metrics)

    loop = TrainLoop(ctx, train, model=model, masking=masking, loss_fn=loss_fn,
                     batch_for=lambda task: batch(task, gens["data"]),
                     score_batches=lambda task: [batch(task, gens["scores"]) for _ in range(cfg.masking.grad_batches)],
                     generators=gens, grouping_at=warmup, evaluate=evaluate_at, evaluate_last_step=True, best_key=None,
                     train_info=lambda step, task: {"train/task": float(task)})
    loop.restore()

    # ------------------------------------------------------------------ train, evaluate, finish
    loop.train()
    with evaluation(f"final evaluation after {train.steps} steps", len(tasks)) as shown:
        final = evaluate(masking, data, device)
        shown.result = f"mean accuracy {sum(v['accuracy'] for v in final.values()) / len(final):.4f}"
    masks = masking.masks
    return loop.finish(
        cfg, per_task=final, headline="accuracy", table=f"digits: test metrics after {train.steps} steps",
        title=f"digits ({', '.join(f'{k}={v}' for k, v in chosen_options(cfg).items() if k != 'recipe')})",
        extra={"task_to_group": masks.task_to_group, "density": masks.density().tolist(),
               "resumed_from": loop.resumed_from})
