"""HarmoDT recipe: a Prompt Decision Transformer on Meta-World offline data, with per-task masks.

    python tools/run.py recipe=harmodt                          # HarmoDT-F on the embedded CPU data
    python tools/run.py recipe=harmodt method=prompt_dt         # dense Prompt-DT, same code path
    python tools/run.py recipe=harmodt method=mtdt              # task-id embedding, no prompt, dense
    python tools/run.py recipe=harmodt method=harmodt_r         # frozen random masks
    python tools/run.py recipe=harmodt method=pcgrad            # MTDT, every task each step, PCGrad (or cagrad)
    python tools/run.py recipe=harmodt debug=smoke              # seconds, on CPU
    python tools/run.py recipe=harmodt data=ml45_tiny           # train on ML45's 45 tasks, then evaluate the
                                                                # voting mask on its 5 unseen tasks
"""

from __future__ import annotations

import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from maskmtl import MaskedAdamW, MaskedModel, MaskSet, save_checkpoint, save_masks
from maskmtl.config import ConfigError, Masking, build, check_keys, is_bool, is_int, is_number
from maskmtl.outputs import CHECKPOINT, MASKS, METRICS, MetricsLog
from maskmtl.structures import print_structure_report
from maskmtl.targets import print_target_report, target_report_rows
from recipes.common import (Preemption, evaluation, kill_point, make_generator, metrics_rows, multi_task_step,
                            next_task, plot_curves, plot_masks, print_table, restore_run, start_run,
                            training_progress, write_results)
from recipes.harmodt.evaluate import HELDOUT_BATCH, EvalReport, GridPolicy, heldout_batches, heldout_mse, run_grid
from recipes.harmodt.model import PromptDT
from recipes.metaworld.make_data import (check_data_config, dataset_tasks, ensure_dataset, ensure_demos,
                                         smoke_data_overrides, unseen_tasks)
from recipes.metaworld.sampler import SamplingConfig, SegmentSampler
from recipes.metaworld.storage import OfflineDataset


def make_loss_fn(use_prompt: bool, task_id: bool):
    def loss_fn(forward, task: int, batch: dict) -> torch.Tensor:
        """MSE of predicted actions over the real (unpadded) steps of the segments."""
        prompt = None
        if use_prompt:
            prompt = (batch["prompt_states"], batch["prompt_actions"], batch["prompt_returns_to_go"],
                      batch["prompt_timesteps"], batch["prompt_mask"])
        pred = forward(batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], batch["mask"],
                       prompt=prompt, task=batch["task"] if task_id else None)  # (B, K, A)
        err = (pred - batch["actions"]).square().mean(-1)  # (B, K)
        return err[batch["mask"]].mean()
    return loss_fn


def example_inputs(sampler: SegmentSampler, model_cfg: dict, device) -> dict:
    """Keyword inputs of one small batch of task 0 (fixed seed), to trace the model for structured
    masks and export."""
    b = sampler.sample_task(0, 2, np.random.default_rng(0)).to_torch(device)
    return forward_kwargs(b, model_cfg["prompt"], model_cfg["task_id"])


def forward_kwargs(batch: dict, use_prompt: bool, task_id: bool) -> dict:
    """The model's keyword inputs from a sampled batch."""
    prompt = None
    if use_prompt:
        prompt = (batch["prompt_states"], batch["prompt_actions"], batch["prompt_returns_to_go"],
                  batch["prompt_timesteps"], batch["prompt_mask"])
    return {"states": batch["states"], "actions": batch["actions"], "rtg": batch["returns_to_go"],
            "timesteps": batch["timesteps"], "mask": batch["mask"], "prompt": prompt,
            "task": batch["task"] if task_id else None}


def export_setup(cfg: DictConfig, state: dict) -> tuple[torch.nn.Module, dict, dict]:
    """For ``tools/export.py``: the full model (sizes read from the weights in ``state``, so no
    data is loaded), synthetic example inputs of the right shapes, and the config that builds the
    same full model again."""
    m = dict(cfg.model)
    d_model, state_dim = state["embed.state.weight"].shape
    model_config = {"state_dim": int(state_dim), "act_dim": int(state["embed.action.weight"].shape[1]),
                    "d_model": int(d_model), "n_layer": int(m["n_layer"]), "n_head": int(m["n_head"]),
                    "dropout": float(m["dropout"]), "max_ep_len": int(state["embed.timestep.weight"].shape[0]),
                    "use_prompt": bool(m["prompt"]),
                    "n_tasks": int(state["task_embed.weight"].shape[0]) if m["task_id"] else 0}
    model = PromptDT(**model_config)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    k, kp, b = 20, 5, 2

    def seq(n):
        return {"states": torch.randn(b, n, model_config["state_dim"], generator=g),
                "actions": torch.rand(b, n, model_config["act_dim"], generator=g) * 2 - 1,
                "returns_to_go": torch.rand(b, n, 1, generator=g),
                "timesteps": torch.randint(model_config["max_ep_len"], (b, n), generator=g),
                "mask": torch.ones(b, n, dtype=torch.bool)}
    batch = seq(k) | {f"prompt_{key}": v for key, v in seq(kp).items()} | {"task": torch.zeros(b, dtype=torch.long)}
    return model, forward_kwargs(batch, m["prompt"], m["task_id"]), model_config


def segment_batches(sampler: SegmentSampler, batch_size: int, grad_batches: int, score_rng: np.random.Generator,
                    device):
    """``batch_for(task, rng)``: one training batch of ``task``; ``score_batches(task)``: the
    ``grad_batches`` batches a mask update averages over, drawn from ``score_rng``."""
    def batch_for(task: int, rng: np.random.Generator) -> dict:
        return sampler.sample_task(task, batch_size, rng).to_torch(device)

    def score_batches(task: int) -> list[dict]:
        return [batch_for(task, score_rng) for _ in range(grad_batches)]
    return batch_for, score_batches


def warmup_lr(train: DictConfig, step: int) -> float:
    """Linear warm-up over ``train.warmup_steps``, then constant ``train.lr`` (spec §8)."""
    return train.lr * min(1.0, step / max(1, train.warmup_steps))


def evaluate(cfg: DictConfig, ev: dict, model, masking: Masking, sampler: SegmentSampler,
             rtg_target: np.ndarray, envs: list[list], device) -> EvalReport:
    """``ev["episodes"]`` episodes of every task, ``ev["parallel"]`` at a time per task."""
    return play(ev, model, masking.masks, sampler, rtg_target, envs, prompt=cfg.model.prompt,
                task_ids=cfg.model.task_id, device=device)


def play(ev: dict, model, masks: MaskSet, sampler: SegmentSampler, rtg_target: np.ndarray, envs: list[list], *,
         prompt: bool, task_ids: bool, device, seed_offset: int = 0) -> EvalReport:
    """Evaluate ``model`` under ``masks`` (one row per task of ``sampler``): prompts, state statistics and
    reward scale from ``sampler``; episode seeds from (eval seed, ``seed_offset`` + task row, episode)."""
    tasks = sampler.tasks
    rows = list(range(len(tasks)))
    prompts = None
    if prompt:
        b = sampler.prompt(np.arange(len(tasks))).to_torch(device)
        prompts = (b["prompt_states"], b["prompt_actions"], b["prompt_returns_to_go"], b["prompt_timesteps"],
                   b["prompt_mask"])
    was_training = model.training
    model.eval()
    dense = bool((masks.density() == 1.0).all())  # all-ones masks: one plain batch, no vmap
    policy = GridPolicy(model, rows, None if dense else masks, prompts, task_ids=task_ids)
    report = EvalReport([])
    n = ev["parallel"]
    for first in range(0, ev["episodes"], n):
        episodes = list(range(first, min(first + n, ev["episodes"])))
        part = run_grid(policy, [row[:len(episodes)] for row in envs], tasks, [seed_offset + r for r in rows],
                        episodes, seed=ev["seed"], state_mean=sampler.state_mean, state_std=sampler.state_std,
                        rtg_target=rtg_target, reward_scale=sampler.config.reward_scale,
                        context=sampler.config.context, max_steps=ev["max_steps"],
                        stop_on_success=ev["stop_on_success"])
        report.episodes += part.episodes
        report.policy_s += part.policy_s
        report.sim_s += part.sim_s
        report.env_steps += part.env_steps
    model.train(was_training)
    return report.summarise()


def evaluate_unseen(cfg: DictConfig, ev: dict, model, masks: MaskSet, demos: OfflineDataset,
                    sampling: SamplingConfig, n_train_tasks: int, device) -> tuple[EvalReport, float]:
    """Spec §6: the tasks of ``demos`` were never trained on. Every one of them acts with the voting
    mask of the training tasks' masks (all ones for dense methods). Its prompt, per-task state
    statistics and return-to-go target come from its prompt demonstrations alone. Returns the report
    and the voting mask's density."""
    from recipes.metaworld.generate import make_env

    vote = masks.voting_mask(float(cfg.eval.voting_threshold))
    unseen = MaskSet({n: v[None] for n, v in vote.items()}, demos.tasks, [0] * len(demos.tasks))
    sampler = SegmentSampler(OfflineDataset(list(demos.tasks), dict(demos.data), demos), sampling)
    rtg = np.array([np.quantile(demos[t].episode_returns(), cfg.eval.rtg_quantile) for t in demos.tasks])
    envs = [[make_env(t, ev["seed"]) for _ in range(ev["parallel"])] for t in demos.tasks]
    report = play(ev, model, unseen, sampler, rtg, envs, prompt=cfg.model.prompt, task_ids=False, device=device,
                  seed_offset=n_train_tasks)
    return report, float(unseen.density().mean())


def initial_masks(masking: Masking) -> MaskSet:
    """A copy of the masks as initialised. ``Masking`` draws them from a generator seeded by the run's
    seed, so a resumed run regenerates the same ones; when the updater tracks them (it keeps the
    initial masks in the checkpoint), its copy is used, which is the same masks."""
    masks = masking.masks
    state = masking.updater.state_dict()
    init = state.get("initial") or masks.as_dict()
    return MaskSet({n: init[n].to(masks[n].device).clone() for n in masks.names}, masks.tasks, masks.task_to_group)


def heldout_forwards(masking: Masking, initial: MaskedModel) -> dict:
    """The three mask choices of the held-out loss: name -> (task row -> forward). ``own``: the
    task's current mask; ``init``: its mask right after initialisation; ``neighbour``: the current
    mask of task (i + 1) mod N, on task i's data (task id and prompt stay task i's)."""
    n = masking.masks.n_tasks

    def under(model: MaskedModel, row_of):
        def forward_for(i: int):
            group = model.masks.group_of(row_of(i))
            return lambda *a, **k: model.forward_group(group, *a, **k)
        return forward_for
    return {"own": under(masking.model, lambda i: i), "init": under(initial, lambda i: i),
            "neighbour": under(masking.model, lambda i: (i + 1) % n)}


def heldout_metrics(tasks: list[str], result: dict) -> dict:
    """``eval/<task>/heldout_mse`` and the means ``eval/heldout_mse``, ``_init``, ``_neighbour``."""
    out = {f"eval/{t}/heldout_mse": v for t, v in zip(tasks, result["own"])}
    out["eval/heldout_mse"] = float(np.mean(result["own"]))
    out["eval/heldout_mse_init"] = float(np.mean(result["init"]))
    out["eval/heldout_mse_neighbour"] = float(np.mean(result["neighbour"]))
    return out


SMOKE_MODEL = {"model.d_model": 32, "model.n_layer": 1, "model.n_head": 4}
SMOKE_EVAL = {"eval.episodes": 1, "eval.parallel": 1, "eval.max_steps": 40}


def smoke_overrides(cfg: DictConfig) -> dict:
    """``debug=smoke``: two tasks of short episodes, a 1-layer d=32 model, one 40-step episode per task."""
    return smoke_data_overrides(cfg.data) | SMOKE_MODEL | SMOKE_EVAL


MODEL_KEYS = [
    ("model.d_model", is_int(1), "an integer >= 1"),
    ("model.n_layer", is_int(1), "an integer >= 1"),
    ("model.n_head", is_int(1), "an integer >= 1"),
    ("model.dropout", is_number(0, 1, hi_open=True), "a number in [0, 1)"),
    ("model.prompt", is_bool, "true or false"),
    ("model.task_id", is_bool, "true or false"),
    ("eval.episodes", is_int(1), "an integer >= 1 (episodes per task)"),
    ("eval.parallel", is_int(1), "an integer >= 1 (episodes of a task stepped together)"),
    ("eval.max_steps", is_int(1, 500), "an integer in 1..500 (Meta-World episodes end at 500)"),
    ("eval.stop_on_success", is_bool, "true or false"),
    ("eval.rtg_quantile", is_number(0, 1), "a number in [0, 1] (a quantile of each task's returns)"),
    ("eval.seed", is_int(0), "an integer >= 0"),
]
HELDOUT_KEYS = [
    ("eval.heldout_batches", is_int(0, 1000), f"an integer in 0..1000 (batches of {HELDOUT_BATCH} held-out segments "
                                              f"per task at every evaluation; 0: no held-out loss)"),
]


def check_model_config(cfg: DictConfig) -> None:
    """The Prompt-DT, evaluation and data keys both Meta-World training recipes share."""
    check_keys(cfg, MODEL_KEYS)
    if cfg.model.d_model % cfg.model.n_head:
        raise ConfigError(f"model.d_model={cfg.model.d_model}: expected a multiple of model.n_head={cfg.model.n_head}")
    check_data_config(cfg.data)
    if cfg.model.prompt and OmegaConf.select(cfg, "data.sampling.prompt_length", default=1) < 1:
        raise ConfigError("model.prompt=true needs data.sampling.prompt_length >= 1")


def check_config(cfg: DictConfig) -> None:
    """Every harmodt key, before any data is generated (recipes/launch.py calls it)."""
    if "gate" in cfg:  # a task-agnostic method file (conf/method/ta_*, g_harmodt) sets gate.*
        raise ConfigError(f"method={cfg.method_name} belongs to recipe=g_harmodt (task-agnostic evaluation); the "
                          f"harmodt recipe's methods are prompt_dt, mtdt, mtdt_mean, pcgrad, cagrad, harmodt_r/m/f, "
                          f"harmodt_random")
    check_model_config(cfg)
    check_keys(cfg, HELDOUT_KEYS)
    heldout = int(OmegaConf.select(cfg, "eval.heldout_batches", default=0) or 0)
    sampling = OmegaConf.select(cfg, "data.sampling.heldout_episodes", default=SamplingConfig.heldout_episodes)
    if heldout and sampling == 0 and int(OmegaConf.select(cfg, "data.prompt_demos", default=0) or 0) < 1:
        raise ConfigError(f"eval.heldout_batches={heldout}: the held-out loss needs episodes no training step reads "
                          f"(data.sampling.heldout_episodes >= 1 or data.prompt_demos >= 1); or set "
                          f"eval.heldout_batches=0")
    unseen = unseen_tasks(cfg.data)
    n_train = len(dataset_tasks(cfg.data))
    try:
        n_groups = build(cfg.grouper, "grouper").n_groups(n_train)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if n_groups < n_train:
        raise ConfigError(f"grouper={OmegaConf.select(cfg, 'grouper._target_')} makes {n_groups} groups of "
                          f"{n_train} tasks: the harmodt recipe trains one mask per task (grouper=none); "
                          f"grouped masks are the g_harmodt recipe's")
    if unseen and cfg.model.task_id:
        raise ConfigError(f"data.unseen_tasks {unseen}: a task-id model (model.task_id=true, MTDT) has no "
                          f"embedding for tasks it never trained on; use a prompt-based method")
    if unseen and not (is_number()(cfg.eval.voting_threshold) and 0 < float(cfg.eval.voting_threshold) < n_train):
        raise ConfigError(f"eval.voting_threshold={cfg.eval.voting_threshold}: expected a fraction in (0, 1) "
                          f"or a count in [1, {n_train}) of the training tasks")


def run(cfg: DictConfig) -> dict | None:
    # ------------------------------------------------------------------ build
    t_start, device, out = start_run(cfg)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    data_node, ev, m = cfg.data, dict(cfg.eval), dict(cfg.model)
    unseen = unseen_tasks(data_node)
    dataset = ensure_dataset(data_node, cfg.data_root)
    sampler = SegmentSampler(dataset, SamplingConfig.from_config(data_node.get("sampling")))
    tasks = list(dataset.tasks)
    if m["prompt"] and sampler.config.prompt_length < 1:
        raise ConfigError("model.prompt=true needs data.sampling.prompt_length >= 1")
    unseen_demos = ensure_demos(data_node, cfg.data_root, unseen) if unseen else None
    # return-to-go target per task: a quantile of that task's episode returns (experts differ widely)
    rtg_target = np.array([np.quantile(dataset[t].episode_returns(), cfg.eval.rtg_quantile) for t in tasks])
    model = PromptDT(dataset.obs_dim, dataset.act_dim, d_model=m["d_model"], n_layer=m["n_layer"],
                     n_head=m["n_head"], dropout=m["dropout"], use_prompt=m["prompt"],
                     max_ep_len=max(int(data_node.get("episode_length", 500)), ev["max_steps"]),
                     n_tasks=len(tasks) if m["task_id"] else 0).to(device)
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1),
                      example_inputs=example_inputs(sampler, m, device))
    masks = masking.masks
    n_heldout = int(OmegaConf.select(cfg, "eval.heldout_batches", default=0) or 0)
    held = heldout_batches(sampler, n_heldout, device) if n_heldout else None  # drawn once, fixed generators
    multi = multi_task_step(cfg, model, masking, len(tasks))  # None unless train.gradient=mean|pcgrad|cagrad
    print_target_report(target_report_rows(model, masking.targets, masks.as_dict()))
    if masking.structures is not None:
        print_structure_report(masking.structures)
    if cfg.dry_run:
        return None
    if masking.needs_grouping:
        raise ConfigError("grouper: the harmodt recipe trains one mask per task (grouper=none); "
                          "grouped masks are the g_harmodt recipe's")
    optimizer = MaskedAdamW(model.named_parameters(), masks, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    loss_fn = make_loss_fn(m["prompt"], m["task_id"])
    gens = {"tasks": make_generator(cfg.seed, 3), **(multi.generators if multi else {})}
    rngs = {"data": np.random.default_rng([cfg.seed, 2]), "scores": np.random.default_rng([cfg.seed, 4])}
    start, extra, ckpt = restore_run(out, model=model, masks=masks, optimizer=optimizer, generators=gens,
                                     numpy_rngs=rngs, device=device, updater=masking.updater)
    wall_before, best = extra.get("wall_time_s", 0.0), extra.get("best")
    initial = MaskedModel(model, initial_masks(masking)) if held is not None else None  # after restore: its copy
    log = MetricsLog(out / METRICS, resume_step=start)  # start: the checkpoint's step, 0 for a fresh start
    envs = None  # built at the first evaluation, reused after

    batch_for, score_batches = segment_batches(sampler, cfg.train.batch_size, cfg.masking.grad_batches,
                                               rngs["scores"], device)

    def extra_state():
        return {"wall_time_s": wall_before + time.perf_counter() - t_start, "best": best,
                "updater": masking.updater.state_dict(),
                "numpy_rngs": {k: r.bit_generator.state for k, r in rngs.items()}}

    def lr_at(step: int) -> float:
        return warmup_lr(cfg.train, step)

    def heldout_now() -> dict:
        """The held-out metrics now (none without eval.heldout_batches)."""
        if held is None:
            return {}
        return heldout_metrics(tasks, heldout_mse(model, loss_fn, held, heldout_forwards(masking, initial)))

    def evaluate_now(label: str) -> tuple[EvalReport, float, dict]:
        """One evaluation of every task (envs built at the first, reused after), its mean success
        and the held-out metrics."""
        nonlocal envs
        with evaluation(label, len(tasks), ev) as shown:
            if envs is None:
                from recipes.metaworld.generate import make_env
                envs = [[make_env(t, ev["seed"]) for _ in range(ev["parallel"])] for t in tasks]
            rep = evaluate(cfg, ev, model, masking, sampler, rtg_target, envs, device)
            mean = float(np.mean([v["success"] for v in rep.per_task.values()]))
            held_now = heldout_now()
            shown.result = f"mean success {mean:.3f}" + (
                f", held-out mse {held_now['eval/heldout_mse']:.4g}" if held_now else "")
        return rep, mean, held_now

    # ------------------------------------------------------------------ train
    model.train()
    with training_progress(cfg.train.steps, start) as progress, Preemption() as preemption:
        for step in range(start + 1, cfg.train.steps + 1):
            for pg in optimizer.param_groups:
                pg["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            if multi is None:  # train.gradient=plain: one task's batch per step
                task = next_task(step, len(tasks), cfg.train.task_sampling, gens["tasks"])
                loss = loss_fn(masking.model.bind(task), task, batch_for(task, rngs["data"]))
                loss.backward()
            else:  # a batch from each of the step's tasks, their gradients combined into .grad (mean, PCGrad, CAGrad)
                task = None
                loss = multi.backward(step, gens["tasks"],
                                      lambda t: loss_fn(masking.model.bind(t), t, batch_for(t, rngs["data"])))
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step(group=None if task is None else masks.group_of(task))  # None: dense step (masks all-ones)
            metrics = {}

            # -------------------------------------------------- mask update (Algorithm 2)
            if masking.updater.due(step):
                metrics.update(progress.mask_update(step, masking.updater.update(step, model, masks, loss_fn,
                                                                                 score_batches, optimizer)))

            if step % cfg.train.log_every == 0:
                metrics.update({"train/loss": loss.item(), "train/lr": lr_at(step), **(multi.surgery.last if multi else {})})

            # -------------------------------------------------- evaluate
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                rep, mean_success, held_metrics = evaluate_now(f"evaluation at step {step}")
                kill_point(f"eval:{step}")
                metrics.update({f"eval/{t}/success": v["success"] for t, v in rep.per_task.items()})
                metrics.update(held_metrics)
                metrics.update({"eval/mean_success": mean_success, "time/eval_policy_s": rep.policy_s,
                                "time/eval_sim_s": rep.sim_s})
                if best is None or mean_success > best["mean_success"]:
                    best = {"step": step, "mean_success": mean_success, "per_task": rep.per_task}
            if metrics:
                log.log(step, metrics)
            preemption.checkpoint(step, cfg.train.steps, cfg.train.checkpoint_every, lambda: save_checkpoint(
                out / CHECKPOINT, step=step, model=model, masks=masks, optimizer=optimizer, generators=gens,
                extra=extra_state()), out / CHECKPOINT)
            progress.advance(loss=loss.item())
            kill_point(step)

    # ------------------------------------------------------------------ finish
    log.close()
    # the trained state first: a run stopped from here on resumes at the final evaluation
    save_checkpoint(out / CHECKPOINT, step=cfg.train.steps, model=model, masks=masks, optimizer=optimizer,
                    generators=gens, extra=extra_state() | {"metrics_rows": metrics_rows(out / METRICS)})
    kill_point("final_eval")
    final, final_mean, final_held = evaluate_now(f"final evaluation after {cfg.train.steps} steps")
    if best is None or final_mean > best["mean_success"]:
        best = {"step": cfg.train.steps, "mean_success": final_mean, "per_task": final.per_task}
    log = MetricsLog(out / METRICS)
    log.log(cfg.train.steps, {f"eval/{t}/success": v["success"] for t, v in final.per_task.items()}
            | {"eval/mean_success": final_mean} | final_held)
    log.close()
    save_masks(masks, out / MASKS)
    per_task = {t: {"success": v["success"], "return": v["return"], "best_success": best["per_task"][t]["success"]}
                for t, v in final.per_task.items()}
    heldout_result = None
    if final_held:
        for t in tasks:
            per_task[t]["heldout_mse"] = final_held[f"eval/{t}/heldout_mse"]
        heldout_result = {"mse": final_held["eval/heldout_mse"], "mse_init": final_held["eval/heldout_mse_init"],
                          "mse_neighbour": final_held["eval/heldout_mse_neighbour"], "batches_per_task": n_heldout,
                          "batch_size": HELDOUT_BATCH}
    print_table(f"harmodt ({cfg.method_name}): success after {cfg.train.steps} steps "
                f"(best = the evaluation with the highest mean success)", per_task)
    unseen_result = None
    if unseen_demos is not None:
        with evaluation("evaluation of the unseen tasks", len(unseen_demos.tasks), ev):
            rep, vote_density = evaluate_unseen(cfg, ev, model, masks, unseen_demos, sampler.config, len(tasks), device)
        unseen_result = {"tasks": list(unseen_demos.tasks), "voting_threshold": float(cfg.eval.voting_threshold),
                         "voting_density": vote_density, "per_task": rep.per_task,
                         "mean_success": float(np.mean([v["success"] for v in rep.per_task.values()])),
                         "episodes": [e.__dict__ for e in rep.episodes]}
        print_table(f"unseen tasks (voting mask, threshold {cfg.eval.voting_threshold}, density {vote_density:.3f}): "
                    f"mean success {unseen_result['mean_success']:.3f}",
                    {t: {"success": v["success"], "return": v["return"]} for t, v in rep.per_task.items()})
    # figures first: results.json marks the run finished, so a kill before it leaves a run that resumes
    plot_curves(out / METRICS, out / "curves.png", title=f"harmodt {cfg.method_name} seed {cfg.seed}")
    plot_masks(masks, out / "masks.png", title=f"harmodt {cfg.method_name} seed {cfg.seed}", seed=cfg.seed)
    kill_point("results")
    results = write_results(
        out, cfg, tasks=tasks, per_task=per_task, headline="success", steps=cfg.train.steps,
        wall_time_s=extra_state()["wall_time_s"],
        extra={"method": cfg.method_name, "best": best, "rtg_target": dict(zip(tasks, rtg_target.tolist())),
               "episodes": [e.__dict__ for e in final.episodes], "density": masks.density().tolist(),
               "resumed_from": start if ckpt is not None else None, "unseen": unseen_result,
               "heldout": heldout_result},
    )
    print(f"results: {out / 'results.json'}")
    return results
