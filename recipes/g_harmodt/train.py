"""G-HarmoDT recipe (journal Sec. IV-C, Algorithms 3-5): group-wise masks and a gating network, so
that a Prompt Decision Transformer needs no task id at evaluation.

    python tools/run.py recipe=g_harmodt                                 # G-HarmoDT, N^G = 5, CPU profile
    python tools/run.py recipe=g_harmodt grouper.n_groups=3              # another group count
    python tools/run.py recipe=g_harmodt method=ta_harmodt_gating        # HarmoDT, gate predicts the task
    python tools/run.py recipe=g_harmodt method=ta_prompt_dt             # Prompt-DT, no id, no gate
    python tools/run.py recipe=g_harmodt debug=smoke                     # seconds, on CPU

Stages (with ``grouper=knn`` and N^G < N):
1. dense warm-up for ``grouping.warmup_steps`` steps (all-ones masks, dense forward and AdamW);
2. at that step, ``maskmtl.group_tasks``: each task's harmony vector with the all-ones mask, the
   grouper's clusters, and group masks from the summed scores at the initializer's density; the
   groups, the distances between the tasks' vectors and the vectors themselves are written to
   ``grouping.json`` / ``harmony_vectors.safetensors``;
3. group-wise training (a task steps on its group's mask) with group-wise mask updates every t_m.
With ``grouper=none`` (or N^G = N) there is no warm-up: per-task masks from the start (HarmoDT).

The gate (``recipes/g_harmodt/gate.py``) learns ``gate.target`` labels (group, or task for the
"+gating" baselines) from the offline data, either after the main model (``gate.schedule=after``,
``gate.steps`` steps) or alongside it (``simultaneous``: one gate step per training step once the
labels exist). The final evaluation is task-agnostic (``recipes/g_harmodt/evaluate.py``);
evaluations during training, and optionally a final one (``eval.task_provided``), give the task id
for reference (keys ``eval/<task>/success_id``).

``debug=smoke``: the first 4 tasks of short episodes (N^G = 2 when more groups than tasks were asked),
warm-up at most half the steps, at most 50 gate steps, a 1-layer d=32 model and one 40-step
episode per task.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from maskmtl import MaskedAdamW, check_schedule, group_tasks, save_checkpoint, save_masks
from maskmtl.config import ConfigError, Masking, build, require
from maskmtl.masks import atomic_write_bytes
from maskmtl.outputs import CHECKPOINT, MASKS, METRICS, MetricsLog, write_json
from maskmtl.targets import print_target_report, target_report_rows
from recipes.common import (Preemption, evaluation, kill_point, make_generator, metrics_rows, next_task, phase,
                            plot_curves, plot_masks, print_table, restore_run, start_run, training_progress,
                            write_results)
from recipes.g_harmodt.evaluate import BLIND, PROBE_PARAMS, Routing, evaluate_agnostic
from recipes.g_harmodt.gate import WINDOWS, Gate, GateData, accuracy_report, check_gate_data
from recipes.g_harmodt.plots import plot_gate, plot_grouping
from recipes.harmodt.model import PromptDT
from recipes.harmodt.train import evaluate as evaluate_with_id
from recipes.harmodt.train import make_loss_fn, segment_batches, warmup_lr
from recipes.harmodt.train import SMOKE_EVAL, SMOKE_MODEL, check_model_config
from recipes.metaworld.make_data import dataset_tasks, ensure_dataset, smoke_data_overrides
from recipes.metaworld.sampler import SamplingConfig, SegmentSampler

METHODS = ("g_harmodt", "ta_harmodt", "ta_harmodt_gating", "ta_prompt_dt", "ta_prompt_dt_gating", "ta_mtdt", "ta_mtdt_gating")
TARGETS = ("group", "task", "none")
SCHEDULES = ("after", "simultaneous")
GROUPING = "grouping.json"
VECTORS = "harmony_vectors.safetensors"


def check_gate_config(cfg: DictConfig, m: dict) -> None:
    """Every ``gate.*`` key and the recipe's task-agnostic requirements, before anything is built."""
    is_int = lambda lo: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo)  # noqa: E731
    if cfg.method_name not in METHODS:
        raise ConfigError(f"method={cfg.method_name}: the g_harmodt recipe's methods are {METHODS} "
                          f"(the task-id methods belong to recipe=harmodt)")
    require(cfg, "gate.target", lambda v: v in TARGETS, f"one of {TARGETS}")
    require(cfg, "gate.schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
    require(cfg, "gate.probe_params", lambda v: v in PROBE_PARAMS, f"one of {PROBE_PARAMS}")
    require(cfg, "gate.blind", lambda v: v in BLIND, f"one of {BLIND}")
    require(cfg, "gate.window", lambda v: v in WINDOWS, f"one of {WINDOWS}")
    gn = require(cfg, "gate.transitions", is_int(1), "an integer >= 1 (gn)")
    probe = require(cfg, "gate.probe_steps", is_int(1), "an integer >= 1")
    if probe < gn:
        raise ConfigError(f"gate.probe_steps={probe}: expected >= gate.transitions={gn} (the gate reads the "
                          f"probe's last gn transitions)")
    for key in ("gate.steps", "gate.batch_size", "gate.hidden", "gate.heldout_episodes"):
        require(cfg, key, is_int(1), "an integer >= 1")
    require(cfg, "gate.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
    require(cfg, "gate.voting_thresh", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
    if cfg.gate.blind == "empty" and (m["task_id"] or not m["prompt"]):
        raise ConfigError("gate.blind=empty: only a prompt model without task ids can act without a task "
                          "(use gate.blind=random)")
    if cfg.data.sampling.state_norm == "task":
        raise ConfigError("data.sampling.state_norm=task: per-task state statistics tell the policy its task; "
                          "task-agnostic evaluation needs all (pooled) or none")


def group_record(tasks: list[str], g: dict, step: int) -> dict:
    """The grouping stage's record: groups, harmony, and cosine distances between task vectors."""
    v = g["task_vectors"].detach().double().cpu()
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    return {"step": step, "tasks": tasks, "task_to_group": list(g["task_to_group"]), "harmony": float(g["harmony"]),
            "cosine_distance": dist.tolist(), "vector_norm": v.norm(dim=1).tolist()}


def smoke_overrides(cfg: DictConfig) -> dict:
    """``debug=smoke``: the first 4 tasks of short episodes, a 1-layer d=32 model, one 40-step
    episode per task, at most 50 gate steps, the warm-up at most half the steps, and N^G = 2 when
    more groups than tasks were asked."""
    out = smoke_data_overrides(cfg.data, n_tasks=4) | SMOKE_MODEL | SMOKE_EVAL
    out["gate.steps"] = min(int(cfg.gate.steps), 50)
    out["grouping.warmup_steps"] = min(int(cfg.grouping.warmup_steps), int(cfg.train.steps) // 2)
    if "n_groups" in cfg.grouper and cfg.grouper.n_groups > len(out["data.tasks"]):
        out["grouper.n_groups"] = 2
    return out


def check_config(cfg: DictConfig) -> None:
    """Every g_harmodt key and the stage lengths, before any data is generated (recipes/launch.py
    calls it)."""
    check_gate_config(cfg, dict(cfg.model))
    check_model_config(cfg)
    if cfg.gate.probe_steps >= cfg.eval.max_steps and cfg.gate.target != "none":
        raise ConfigError(f"gate.probe_steps={cfg.gate.probe_steps}: expected < eval.max_steps={cfg.eval.max_steps}")
    steps, n_tasks = int(cfg.train.steps), len(dataset_tasks(cfg.data))
    try:
        needs_grouping = build(cfg.grouper, "grouper").n_groups(n_tasks) < n_tasks
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if needs_grouping and not 0 < int(cfg.grouping.warmup_steps) < steps:
        raise ConfigError(f"grouping.warmup_steps={cfg.grouping.warmup_steps}: expected 0 < warmup < "
                          f"train.steps={steps}")


def run(cfg: DictConfig) -> dict | None:
    # ------------------------------------------------------------------ build
    t_start, device, out = start_run(cfg)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    data_node, ev, m, gate_cfg = cfg.data, dict(cfg.eval), dict(cfg.model), dict(cfg.gate)
    steps, n_tasks = int(cfg.train.steps), len(dataset_tasks(data_node))
    needs_grouping = build(cfg.grouper, "grouper").n_groups(n_tasks) < n_tasks
    warmup = int(cfg.grouping.warmup_steps) if needs_grouping else 0
    dataset = ensure_dataset(data_node, cfg.data_root)
    sampler = SegmentSampler(dataset, SamplingConfig.from_config(data_node.get("sampling")))
    tasks = list(dataset.tasks)
    use_gate = gate_cfg["target"] != "none"
    if use_gate:
        try:
            check_gate_data(dataset, gate_cfg["transitions"], gate_cfg["heldout_episodes"])
        except ValueError as e:
            raise ConfigError(str(e)) from e
    model = PromptDT(dataset.obs_dim, dataset.act_dim, d_model=m["d_model"], n_layer=m["n_layer"],
                     n_head=m["n_head"], dropout=m["dropout"], use_prompt=m["prompt"],
                     max_ep_len=max(int(data_node.get("episode_length", 500)), ev["max_steps"]),
                     n_tasks=len(tasks) if m["task_id"] else 0).to(device)
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1))
    masks = masking.masks
    print_target_report(target_report_rows(model, masking.targets, masks.as_dict()))
    assert masking.needs_grouping == needs_grouping
    if masking.needs_grouping:
        need, total = masking.scheduler.max_alpha(), masks.numel()
        active = int(round(masking.group_density() * total))
        if need > active or (need > 0 and need > total - active):
            raise ConfigError(f"scheduler: alpha reaches {need} but group masks will have {active} active and "
                              f"{total - active} inactive entries (density {masking.group_density()})")
    if cfg.dry_run:
        return None
    optimizer = MaskedAdamW(model.named_parameters(), masks, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    loss_fn = make_loss_fn(m["prompt"], m["task_id"])
    gens = {"tasks": make_generator(cfg.seed, 3)}
    rngs = {"data": np.random.default_rng([cfg.seed, 2]), "scores": np.random.default_rng([cfg.seed, 4])}
    returns = [dataset[t].episode_returns() for t in tasks]
    rtg_target = np.array([np.quantile(r, cfg.eval.rtg_quantile) for r in returns])  # with the task id

    def make_gate() -> Gate:
        labels = masks.task_to_group if gate_cfg["target"] == "group" else list(range(len(tasks)))
        max_start = gate_cfg["probe_steps"] - gate_cfg["transitions"] if gate_cfg["window"] == "probe" else None
        try:
            data = GateData(dataset, labels, gate_cfg["transitions"], max_start, gate_cfg["heldout_episodes"], cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return Gate(data, hidden=gate_cfg["hidden"], lr=gate_cfg["lr"], batch_size=gate_cfg["batch_size"],
                    seed=cfg.seed, device=device)

    gate = None
    start, extra, ckpt = restore_run(out, model=model, masks=masks, optimizer=optimizer, generators=gens,
                                     numpy_rngs=rngs, device=device, updater=masking.updater)
    wall_before, best = extra.get("wall_time_s", 0.0), extra.get("best")
    if extra.get("gate") is not None:
        gate = make_gate()
        gate.load_state_dict(extra["gate"])
    log = MetricsLog(out / METRICS, resume_step=start)  # start: the checkpoint's step, 0 for a fresh start
    envs = None  # built at the first evaluation, reused after

    def make_envs():
        from recipes.metaworld.generate import make_env
        return [[make_env(t, ev["seed"]) for _ in range(ev["parallel"])] for t in tasks]

    batch_for, score_batches = segment_batches(sampler, cfg.train.batch_size, cfg.masking.grad_batches,
                                               rngs["scores"], device)

    def extra_state():
        return {"wall_time_s": wall_before + time.perf_counter() - t_start, "best": best,
                "updater": masking.updater.state_dict(),
                "numpy_rngs": {k: r.bit_generator.state for k, r in rngs.items()},
                "gate": gate.state_dict() if gate is not None else None}

    def lr_at(step: int) -> float:
        return warmup_lr(cfg.train, step)

    # ------------------------------------------------------------------ train
    model.train()
    with training_progress(steps, start) as progress, Preemption() as preemption:
        for step in range(start + 1, steps + 1):
            task = next_task(step, len(tasks), cfg.train.task_sampling, gens["tasks"])
            dense_stage = step <= warmup  # stage 1: dense θ, no masks
            for pg in optimizer.param_groups:
                pg["lr"] = lr_at(step)
            loss = loss_fn(masking.model.bind(None if dense_stage else task), task, batch_for(task, rngs["data"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step(group=None if dense_stage else masks.group_of(task))
            metrics = {}

            # -------------------------------------------------- grouping (stage 2, Algorithm 4)
            if masking.needs_grouping and step == warmup:
                with phase(f"grouping at step {step}", detail=f"{len(tasks)} tasks"):
                    g = group_tasks(model, masks, masking.scorer, masking.grouper, loss_fn, score_batches,
                                    masking.group_density(), cfg.seed, cfg.masking.recovery_gradient)
                check_schedule(masking.scheduler, masks)
                masking.updater.track(masks)  # the group masks are the initial masks of the updates that follow
                record = group_record(tasks, g, step)
                write_json(out / GROUPING, record)
                from safetensors.torch import save as st_save
                atomic_write_bytes(out / VECTORS, st_save({"vectors": g["task_vectors"].detach().float().cpu().contiguous()},
                                                          metadata={"tasks": json.dumps(tasks)}))
                print(f"step {step}: grouped tasks {dict(zip(tasks, g['task_to_group']))}")
                metrics.update({"mask/harmony": g["harmony"], "mask/groups": float(masks.n_groups)})

            # -------------------------------------------------- group-wise mask update (Algorithm 5)
            elif step > warmup and masking.updater.due(step):
                metrics.update(progress.mask_update(step, masking.updater.update(step, model, masks, loss_fn,
                                                                                 score_batches, optimizer)))

            # -------------------------------------------------- gate, trained alongside
            if use_gate and gate_cfg["schedule"] == "simultaneous" and step >= warmup:
                if gate is None:
                    gate = make_gate()
                gate_loss = gate.step()
                if step % cfg.train.log_every == 0:
                    metrics["train/gate_loss"] = gate_loss

            if step % cfg.train.log_every == 0:
                metrics.update({"train/loss": loss.item(), "train/lr": lr_at(step)})

            # -------------------------------------------------- evaluate (task id given, for reference)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                with evaluation(f"evaluation at step {step} (task id given)", len(tasks), ev) as shown:
                    envs = envs or make_envs()
                    rep = evaluate_with_id(cfg, ev, model, masking, sampler, rtg_target, envs, device)
                    mean_success = float(np.mean([v["success"] for v in rep.per_task.values()]))
                    shown.result = f"mean success {mean_success:.3f}"
                metrics.update({f"eval/{t}/success_id": v["success"] for t, v in rep.per_task.items()})
                metrics.update({"eval/mean_success_id": mean_success, "time/eval_policy_s": rep.policy_s})
                if best is None or mean_success > best["mean_success"]:
                    best = {"step": step, "mean_success": mean_success, "per_task": rep.per_task}
            if metrics:
                log.log(step, metrics)
            preemption.checkpoint(step, steps, cfg.train.checkpoint_every, lambda: save_checkpoint(
                out / CHECKPOINT, step=step, model=model, masks=masks, optimizer=optimizer, generators=gens,
                extra=extra_state()), out / CHECKPOINT)
            progress.advance(loss=loss.item())
            kill_point(step)

    # ------------------------------------------------------------------ gate, trained after
    log.close()
    # the trained state first: a run stopped from here on resumes here (the gate of schedule=after is
    # trained again from its seed), its metrics log cut back to these rows
    save_checkpoint(out / CHECKPOINT, step=steps, model=model, masks=masks, optimizer=optimizer,
                    generators=gens, extra=extra_state() | {"metrics_rows": metrics_rows(out / METRICS)})
    kill_point("final_eval")
    log = MetricsLog(out / METRICS)
    if use_gate and gate_cfg["schedule"] == "after":
        gate = make_gate()
        with phase("gate training", gate_cfg["steps"]) as shown:
            for k in range(1, gate_cfg["steps"] + 1):
                gate_loss = gate.step()
                if k % max(1, gate_cfg["steps"] // 10) == 0 or k == gate_cfg["steps"]:
                    log.log(steps, {"train/gate_step": k, "train/gate_loss": gate_loss})
                shown.advance(info=f"loss {gate_loss:.4f}")
            shown.result = f"last loss {gate_loss:.4f}"

    # ------------------------------------------------------------------ finish: task-agnostic evaluation
    envs = envs or make_envs()
    t2g = masks.task_to_group
    if gate_cfg["target"] == "group":
        members = [[i for i in range(len(tasks)) if t2g[i] == g] for g in range(masks.n_groups)]
        label_group = list(range(masks.n_groups))
    else:  # task labels (also used, unrouted, when there is no gate)
        members = [[i] for i in range(len(tasks))]
        label_group = list(t2g)
    routing = Routing(group=label_group, members=members,
                      rtg=np.array([np.quantile(np.concatenate([returns[i] for i in mem]), cfg.eval.rtg_quantile)
                                    for mem in members]),
                      pooled_rtg=float(np.quantile(np.concatenate(returns), cfg.eval.rtg_quantile)))
    prompts = None
    if m["prompt"]:
        b = sampler.prompt(np.arange(len(tasks))).to_torch(device)
        prompts = (b["prompt_states"], b["prompt_actions"], b["prompt_returns_to_go"], b["prompt_timesteps"],
                   b["prompt_mask"])
    with evaluation(f"final task-agnostic evaluation after {steps} steps", len(tasks), ev) as shown:
        final, predictions = evaluate_agnostic(
            model, masks=masks, gate=gate, routing=routing, probe_params=gate_cfg["probe_params"],
            voting_thresh=gate_cfg["voting_thresh"], prompts=prompts, task_ids=m["task_id"], blind=gate_cfg["blind"],
            probe_steps=gate_cfg["probe_steps"], gn=gate_cfg["transitions"], envs=envs, tasks=tasks,
            state_mean=sampler.state_mean, state_std=sampler.state_std, reward_scale=sampler.config.reward_scale,
            context=sampler.config.context, ev=ev)
        shown.result = f"mean success {np.mean([v['success'] for v in final.per_task.values()]):.3f}"
    with_id = None
    if ev["task_provided"]:
        with evaluation("final evaluation with the task id", len(tasks), ev) as shown:
            with_id = evaluate_with_id(cfg, ev, model, masking, sampler, rtg_target, envs, device)
            shown.result = f"mean success {np.mean([v['success'] for v in with_id.per_task.values()]):.3f}"

    # ------------------------------------------------------------------ results
    gate_report = None
    per_task = {t: {"success": v["success"], "return": v["return"]} for t, v in final.per_task.items()}
    if use_gate:
        labels = np.asarray(gate.data.labels)
        seen = [p for p in predictions if p["label"] >= 0]
        truth = [int(labels[tasks.index(p["task"])]) for p in seen]
        rollout = accuracy_report([p["label"] for p in seen], truth, gate.data.n_classes)
        gate_report = {"target": gate_cfg["target"], "schedule": gate_cfg["schedule"], "steps": gate.steps,
                       "labels": {str(k): [tasks[i] for i in mem] for k, mem in enumerate(members)},
                       "heldout": gate.heldout_accuracy(), "rollout": rollout,
                       "heldout_episodes": gate.data.heldout()}
        for t in tasks:
            mine = [p for p in seen if p["task"] == t]
            lab = int(labels[tasks.index(t)])
            per_task[t]["gate_correct"] = float(np.mean([p["label"] == lab for p in mine])) if mine else float("nan")
    if with_id is not None:
        for t, v in with_id.per_task.items():
            per_task[t]["success_id"] = v["success"]
    final_mean = float(np.mean([v["success"] for v in final.per_task.values()]))
    metrics = {f"eval/{t}/success": v["success"] for t, v in final.per_task.items()} | {"eval/mean_success": final_mean}
    if with_id is not None:
        metrics["eval/mean_success_id"] = float(np.mean([v["success"] for v in with_id.per_task.values()]))
    if gate_report is not None:
        metrics["eval/gate_accuracy_heldout"] = gate_report["heldout"]["overall"]
        metrics["eval/gate_accuracy_rollout"] = gate_report["rollout"]["overall"]
    log.log(steps, metrics)
    log.close()
    save_masks(masks, out / MASKS)
    grouping = json.loads((out / GROUPING).read_text()) if masking.needs_grouping else None
    title = f"g_harmodt ({cfg.method_name}, {masks.n_groups} groups, gate: {gate_cfg['target']})"
    print_table(f"{title}: task-agnostic success after {steps} steps", per_task)
    if gate_report is not None:
        print(f"groups: {gate_report['labels'] if gate_cfg['target'] == 'group' else dict(zip(tasks, t2g))}")
        print(f"gate accuracy: held-out episodes {gate_report['heldout']['overall']:.3f} "
              f"(per label {gate_report['heldout']['per_label']}), in evaluation episodes "
              f"{gate_report['rollout']['overall'] if gate_report['rollout']['overall'] is not None else float('nan'):.3f}")
    # figures first: results.json marks the run finished, so a kill before it leaves a run that resumes
    kill_point("figures")
    name = f"recipe g_harmodt, method {cfg.method_name}, {masks.n_groups} groups, seed {cfg.seed}"
    plot_curves(out / METRICS, out / "curves.png", title=name)
    plot_masks(masks, out / "masks.png", title=name, seed=cfg.seed)
    if grouping is not None:
        plot_grouping(grouping, out / "grouping.png", title=name, seed=cfg.seed)
    if gate_report is not None:
        plot_gate(gate_report, out / "gate.png", title=name)
    results = write_results(
        out, cfg, tasks=tasks, per_task=per_task, headline="success", steps=steps,
        wall_time_s=extra_state()["wall_time_s"],
        extra={"method": cfg.method_name, "protocol": "task_agnostic", "n_groups": masks.n_groups,
               "task_to_group": list(t2g), "groups": {str(g): [tasks[i] for i in range(len(tasks)) if t2g[i] == g]
                                                       for g in range(masks.n_groups)},
               "grouping": None if grouping is None else {k: grouping[k] for k in ("step", "harmony")},
               "gate": gate_report, "best_id": best,
               "rtg_target": {"pooled": routing.pooled_rtg, "per_label": routing.rtg.tolist()},
               "episodes": [e.__dict__ for e in final.episodes], "predictions": predictions,
               "density": masks.density().tolist(), "resumed_from": start if ckpt is not None else None,
               "eval_time_s": {"agnostic": {"policy": final.policy_s, "sim": final.sim_s},
                               "with_id": None if with_id is None else {"policy": with_id.policy_s, "sim": with_id.sim_s}}},
    )
    print(f"results: {out / 'results.json'}")
    return results
