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

import json

import numpy as np
from omegaconf import DictConfig

from maskmtl.config import ConfigError, Masking, build, require
from maskmtl.masks import atomic_write_bytes
from maskmtl.outputs import write_json
from recipes.common import evaluation, make_generator, phase
from recipes.g_harmodt.evaluate import BLIND, PROBE_PARAMS, Routing, evaluate_agnostic
from recipes.g_harmodt.gate import WINDOWS, Gate, GateData, GateSpec, accuracy_report, check_gate_data
from recipes.g_harmodt.plots import plot_gate, plot_grouping
from recipes.harmodt.evaluate import EvalReport
from recipes.harmodt.train import PromptDTSetup, eval_prompts, make_envs, mean_success
from recipes.harmodt.train import SMOKE_EVAL, SMOKE_MODEL, check_model_config
from recipes.loop import Evaluation, RunContext, TrainLoop, report_masking
from recipes.metaworld.make_data import dataset_tasks, smoke_data_overrides

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
    dataset_tasks(cfg.data)  # first: Meta-World data only (locomotion data is refused, naming data.benchmark)
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


def train_gate_after(loop: TrainLoop, make_gate, gs: GateSpec) -> Gate:
    """``gate.schedule=after``: ``gate.steps`` steps of a fresh gate on the trained model's labels
    (its losses logged at the last training step)."""
    gate = make_gate()
    with phase("gate training", gs.steps) as shown:
        for k in range(1, gs.steps + 1):
            gate_loss = gate.step()
            if k % max(1, gs.steps // 10) == 0 or k == gs.steps:
                loop.log(loop.spec.steps, {"train/gate_step": k, "train/gate_loss": gate_loss})
            shown.advance(info=f"loss {gate_loss:.4f}")
        shown.result = f"last loss {gate_loss:.4f}"
    return gate


def make_routing(gs: GateSpec, task_to_group: list[int], n_groups: int, returns: list[np.ndarray],
                 rtg_quantile: float) -> Routing:
    """What a gate's label means: its tasks (a group's, or one task) and their return target."""
    n = len(task_to_group)
    if gs.target == "group":
        members = [[i for i in range(n) if task_to_group[i] == g] for g in range(n_groups)]
        label_group = list(range(n_groups))
    else:  # task labels (also used, unrouted, when there is no gate)
        members = [[i] for i in range(n)]
        label_group = list(task_to_group)
    return Routing(group=label_group, members=members,
                   rtg=np.array([np.quantile(np.concatenate([returns[i] for i in mem]), rtg_quantile)
                                 for mem in members]),
                   pooled_rtg=float(np.quantile(np.concatenate(returns), rtg_quantile)))


def gate_summary(gate: Gate, gs: GateSpec, predictions: list[dict], tasks: list[str], members: list[list[int]],
                 per_task: dict) -> dict:
    """The gate's accuracy on held-out episodes and in the evaluation episodes (each task's share of
    correct labels added to ``per_task`` as ``gate_correct``)."""
    labels = np.asarray(gate.data.labels)
    seen = [p for p in predictions if p["label"] >= 0]
    truth = [int(labels[tasks.index(p["task"])]) for p in seen]
    rollout = accuracy_report([p["label"] for p in seen], truth, gate.data.n_classes)
    for t in tasks:
        mine = [p for p in seen if p["task"] == t]
        lab = int(labels[tasks.index(t)])
        per_task[t]["gate_correct"] = float(np.mean([p["label"] == lab for p in mine])) if mine else float("nan")
    return {"target": gs.target, "schedule": gs.schedule, "steps": gate.steps,
            "labels": {str(k): [tasks[i] for i in mem] for k, mem in enumerate(members)},
            "heldout": gate.heldout_accuracy(), "rollout": rollout, "heldout_episodes": gate.data.heldout()}


def gate_reports(gate_report: dict | None, gs: GateSpec, tasks: list[str], task_to_group: list[int]) -> tuple:
    """The lines printed under the results table: the groups and the gate's accuracy."""
    if gate_report is None:
        return ()
    shown_groups = gate_report["labels"] if gs.target == "group" else dict(zip(tasks, task_to_group))
    rollout = gate_report["rollout"]["overall"]
    return (lambda: print(f"groups: {shown_groups}"),
            lambda: print(f"gate accuracy: held-out episodes {gate_report['heldout']['overall']:.3f} "
                          f"(per label {gate_report['heldout']['per_label']}), in evaluation episodes "
                          f"{rollout if rollout is not None else float('nan'):.3f}"))


def final_metrics(final: EvalReport, given: EvalReport | None, gate_report: dict | None) -> dict:
    """The metrics row of the final evaluations: task-agnostic success, with the task id, the gate's accuracy."""
    mean = mean_success
    metrics = {f"eval/{t}/success": v["success"] for t, v in final.per_task.items()}
    metrics["eval/mean_success"] = mean(final)
    if given is not None:
        metrics["eval/mean_success_id"] = mean(given)
    if gate_report is not None:
        metrics["eval/gate_accuracy_heldout"] = gate_report["heldout"]["overall"]
        metrics["eval/gate_accuracy_rollout"] = gate_report["rollout"]["overall"]
    return metrics


def gate_data_check(gs: GateSpec):
    """``check(dataset)``: the data can give the gate its transitions and held-out episodes."""
    def check(dataset) -> None:
        try:
            check_gate_data(dataset, gs.transitions, gs.heldout_episodes)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return check


def gate_maker(gs: GateSpec, dataset, masks, seed: int, device):
    """``make_gate()``: a fresh gate on the masks' current labels (groups, or tasks)."""
    def make_gate() -> Gate:
        labels = masks.task_to_group if gs.target == "group" else list(range(masks.n_tasks))
        max_start = gs.probe_steps - gs.transitions if gs.window == "probe" else None
        try:
            data = GateData(dataset, labels, gs.transitions, max_start, gs.heldout_episodes, seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return Gate(data, hidden=gs.hidden, lr=gs.lr, batch_size=gs.batch_size, seed=seed, device=device)
    return make_gate


def grouping_recorder(out, tasks: list[str]):
    """``on_grouped(step, grouping)``: writes ``grouping.json`` and the tasks' harmony vectors."""
    def on_grouped(step: int, g: dict) -> None:
        from safetensors.torch import save as st_save

        write_json(out / GROUPING, group_record(tasks, g, step))
        vectors = g["task_vectors"].detach().float().cpu().contiguous()
        atomic_write_bytes(out / VECTORS, st_save({"vectors": vectors}, metadata={"tasks": json.dumps(tasks)}))
    return on_grouped


def check_group_budget(masking: Masking) -> None:
    """Group masks are made at the initializer's density: α_t must fit their active and inactive entries."""
    if masking.needs_grouping:
        need, total = masking.scheduler.max_alpha(), masking.masks.numel()
        active = int(round(masking.group_density() * total))
        if need > active or (need > 0 and need > total - active):
            raise ConfigError(f"scheduler: alpha reaches {need} but group masks will have {active} active and "
                              f"{total - active} inactive entries (density {masking.group_density()})")


def agnostic_evaluation(setup: PromptDTSetup, masks, gate: Gate | None, gs: GateSpec,
                        routing: Routing) -> tuple[EvalReport, list[dict]]:
    """The final, task-agnostic evaluation (``recipes/g_harmodt/evaluate.py``): report and the gate's labels."""
    ev, spec, sampler, tasks = setup.ev, setup.spec, setup.sampler, setup.tasks
    setup.envs = setup.envs or make_envs(tasks, ev)
    prompts = eval_prompts(sampler, setup.device) if spec.prompt else None
    with evaluation(f"final task-agnostic evaluation after {setup.train.steps} steps", len(tasks), ev) as shown:
        final, predictions = evaluate_agnostic(
            setup.model, masks=masks, gate=gate, routing=routing, probe_params=gs.probe_params,
            voting_thresh=gs.voting_thresh, prompts=prompts, task_ids=spec.task_id, blind=gs.blind,
            probe_steps=gs.probe_steps, gn=gs.transitions, envs=setup.envs, tasks=tasks,
            state_mean=sampler.state_mean, state_std=sampler.state_std, reward_scale=sampler.config.reward_scale,
            context=sampler.config.context, ev=ev)
        shown.result = f"mean success {mean_success(final):.3f}"
    return final, predictions


def g_figures(grouping: dict | None, gate_report: dict | None, title: str, seed: int) -> tuple:
    """``grouping.png`` (grouped runs) and ``gate.png`` (runs with a gate), for ``TrainLoop.finish``."""
    figures = ((lambda out: plot_grouping(grouping, out / "grouping.png", title=title, seed=seed),)
               if grouping is not None else ())
    if gate_report is not None:
        figures += (lambda out: plot_gate(gate_report, out / "gate.png", title=title),)
    return figures


def results_extra(cfg: DictConfig, masks, grouping: dict | None, gate_report: dict | None, loop: TrainLoop,
                  routing: Routing, final: EvalReport, predictions: list[dict], given: EvalReport | None) -> dict:
    """The g_harmodt keys of ``results.json`` beside the per-task results."""
    tasks, t2g = list(masks.tasks), masks.task_to_group
    return {"method": cfg.method_name, "protocol": "task_agnostic", "n_groups": masks.n_groups,
            "task_to_group": list(t2g), "groups": {str(g): [tasks[i] for i in range(len(tasks)) if t2g[i] == g]
                                                    for g in range(masks.n_groups)},
            "grouping": None if grouping is None else {k: grouping[k] for k in ("step", "harmony")},
            "gate": gate_report, "best_id": loop.best,
            "rtg_target": {"pooled": routing.pooled_rtg, "per_label": routing.rtg.tolist()},
            "episodes": [e.__dict__ for e in final.episodes], "predictions": predictions,
            "density": masks.density().tolist(), "resumed_from": loop.resumed_from,
            "eval_time_s": {"agnostic": {"policy": final.policy_s, "sim": final.sim_s},
                            "with_id": None if given is None else {"policy": given.policy_s, "sim": given.sim_s}}}


def run(cfg: DictConfig) -> dict | None:
    # ------------------------------------------------------------------ build
    ctx = RunContext.start(cfg)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    gs = GateSpec.from_config(cfg.gate)
    use_gate = gs.target != "none"
    setup = PromptDTSetup(cfg, ctx, check_data=gate_data_check(gs) if use_gate else None)
    train, ev, model, tasks = setup.train, setup.ev, setup.model, setup.tasks
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1))
    masks = masking.masks
    report_masking(model, masking)
    check_group_budget(masking)
    if ctx.dry_run:
        return None
    warmup = int(cfg.grouping.warmup_steps) if masking.needs_grouping else 0
    make_gate, gate = gate_maker(gs, setup.dataset, masks, cfg.seed, ctx.device), None  # a gate once its labels exist

    def gate_alongside(step: int, metrics: dict) -> None:
        """gate.schedule=simultaneous: one gate step per training step once the labels exist."""
        nonlocal gate
        if use_gate and gs.schedule == "simultaneous" and step >= warmup:
            gate = gate or make_gate()
            gate_loss = gate.step()
            if step % train.log_every == 0:
                metrics["train/gate_loss"] = gate_loss

    def evaluate_at(step: int) -> Evaluation:  # the task id given, for reference
        with evaluation(f"evaluation at step {step} (task id given)", len(tasks), ev) as shown:
            rep = setup.evaluate(masking)
            shown.result = f"mean success {mean_success(rep):.3f}"
        metrics = ({f"eval/{t}/success_id": v["success"] for t, v in rep.per_task.items()}
                   | {"eval/mean_success_id": mean_success(rep), "time/eval_policy_s": rep.policy_s})
        return Evaluation(metrics, mean_success(rep), rep.per_task)

    loop = TrainLoop(ctx, train, model=model, masking=masking, loss_fn=setup.loss_fn, batch_for=setup.batch_for,
                     score_batches=setup.score_batches, generators=setup.generators, numpy_rngs=setup.rngs,
                     dense_until=warmup, grouping_at=warmup, on_grouped=grouping_recorder(ctx.out, tasks),
                     on_step=gate_alongside, evaluate=evaluate_at,
                     extra_state=lambda: {"gate": gate.state_dict() if gate is not None else None})
    loop.restore()
    if loop.extra.get("gate") is not None:
        gate = make_gate()
        gate.load_state_dict(loop.extra["gate"])

    # ------------------------------------------------------------------ train; the gate, trained after
    loop.train()  # a run stopped after it resumes here (the gate of schedule=after is trained again from its seed)
    if use_gate and gs.schedule == "after":
        gate = train_gate_after(loop, make_gate, gs)

    # ------------------------------------------------------------------ task-agnostic evaluation, results
    routing = make_routing(gs, masks.task_to_group, masks.n_groups, setup.returns, ev.rtg_quantile)
    final, predictions = agnostic_evaluation(setup, masks, gate, gs, routing)
    given = None
    if ev.task_provided:
        with evaluation("final evaluation with the task id", len(tasks), ev) as shown:
            given = setup.evaluate(masking)
            shown.result = f"mean success {mean_success(given):.3f}"
    per_task = {t: {"success": v["success"], "return": v["return"]} for t, v in final.per_task.items()}
    gate_report = gate_summary(gate, gs, predictions, tasks, routing.members, per_task) if use_gate else None
    for t, v in (given.per_task.items() if given is not None else ()):
        per_task[t]["success_id"] = v["success"]
    loop.log(train.steps, final_metrics(final, given, gate_report))
    grouping = json.loads((ctx.out / GROUPING).read_text()) if masking.needs_grouping else None
    name = f"recipe g_harmodt, method {cfg.method_name}, {masks.n_groups} groups, seed {cfg.seed}"
    return loop.finish(
        cfg, per_task=per_task, headline="success", title=name,
        figures=g_figures(grouping, gate_report, name, cfg.seed),
        reports=gate_reports(gate_report, gs, tasks, masks.task_to_group),
        table=f"g_harmodt ({cfg.method_name}, {masks.n_groups} groups, gate: {gs.target}): task-agnostic success "
              f"after {train.steps} steps",
        extra=results_extra(cfg, masks, grouping, gate_report, loop, routing, final, predictions, given))
