"""HarmoDT recipe: a Prompt Decision Transformer on offline data, with per-task masks.

    python tools/run.py recipe=harmodt                          # HarmoDT-F on the embedded CPU data
    python tools/run.py recipe=harmodt method=prompt_dt         # dense Prompt-DT, same code path
    python tools/run.py recipe=harmodt method=mtdt              # task-id embedding, no prompt, dense
    python tools/run.py recipe=harmodt method=harmodt_r         # frozen random masks
    python tools/run.py recipe=harmodt method=pcgrad            # MTDT, every task each step, PCGrad (or cagrad)
    python tools/run.py recipe=harmodt method=mtbc              # behaviour cloning, task-id MLP actor (dense)
    python tools/run.py recipe=harmodt method=mtbc_harmodt_f    # the same actor with HarmoDT-F's per-task masks
    python tools/run.py recipe=harmodt method=mgdt              # multi-game DT: no prompt/id, returns predicted
    python tools/run.py recipe=harmodt method=mtiql             # IQL, one critic head per task, task-id actor
    python tools/run.py recipe=harmodt debug=smoke              # seconds, on CPU
    python tools/run.py recipe=harmodt data=ml45_tiny           # train on ML45's 45 tasks, then evaluate the
                                                                # voting mask on its 5 unseen tasks
    python tools/run.py recipe=harmodt data=cheetah_vel         # locomotion: 35 velocities, then the voting
                                                                # mask on the 5 unseen ones, scored by return

The data's benchmark (``data.benchmark``: Meta-World or locomotion, ``recipes/benchmark.py``)
gives the tasks, the dataset, the environments and the metric: Meta-World runs are scored by
success, locomotion runs by return (mean cumulative reward per task).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from maskmtl import MaskedModel, MaskSet
from maskmtl.config import ConfigError, Masking, build, check_keys, is_bool, is_int, is_number
from recipes.benchmark import Benchmark, MetaWorld, benchmark_of
from recipes.common import evaluation, make_generator, multi_task_step, print_table
from recipes.harmodt.evaluate import (HELDOUT_BATCH, POLICY_IMPLS, EvalReport, EvalSpec, GridPolicy, heldout_batches,
                                      heldout_mse, run_grid)
from recipes.harmodt.model import ARCHS, ModelSpec, PromptDT
from recipes.loop import Evaluation, RunContext, TrainLoop, TrainSpec, report_masking
from recipes.metaworld.sampler import SamplingConfig, SegmentSampler
from recipes.metaworld.storage import OfflineDataset


PROMPT_KEYS = ("prompt_states", "prompt_actions", "prompt_returns_to_go", "prompt_timesteps", "prompt_mask")


def prompt_of(batch: dict) -> tuple:
    """The model's ``prompt`` argument from a sampled batch."""
    return tuple(batch[k] for k in PROMPT_KEYS)


def eval_prompts(sampler: SegmentSampler, device) -> tuple:
    """Every task's evaluation prompt (one row per task of ``sampler``)."""
    return prompt_of(sampler.prompt(np.arange(len(sampler.tasks))).to_torch(device))


def make_loss_fn(use_prompt: bool, task_id: bool, arch: str = "dt", return_loss_weight: float = 1.0,
                 return_max: float = 1.0, iql: dict | None = None):
    """The training loss of ``model.arch``: the action MSE over the real (unpadded) steps of the
    segments (dt, mlp); for mgdt, plus ``return_loss_weight`` × the cross-entropy of the binned
    return-to-go (``baselines.return_bin_loss``); for iql, MTIQL's value, Q and advantage-weighted
    actor losses (``baselines.iql_loss``, the ``iql.*`` keys in ``iql``)."""
    from recipes.harmodt.baselines import iql_loss, return_bin_loss

    def loss_fn(forward, task: int, batch: dict) -> torch.Tensor:
        prompt = prompt_of(batch) if use_prompt else None
        args = (batch["states"], batch["actions"], batch["returns_to_go"], batch["timesteps"], batch["mask"])
        kwargs = {"prompt": prompt, "task": batch["task"] if task_id else None}
        if arch == "iql":
            return iql_loss(forward(*args, **kwargs, output="iql"), batch, **iql)
        if arch == "mgdt":
            pred, logits = forward(*args, **kwargs, output="both")
        else:
            pred = forward(*args, **kwargs)  # (B, K, A)
        err = (pred - batch["actions"]).square().mean(-1)  # (B, K)
        loss = err[batch["mask"]].mean()
        if arch == "mgdt":
            loss = loss + return_loss_weight * return_bin_loss(logits, batch["returns_to_go"], batch["mask"],
                                                               return_max)
        return loss
    return loss_fn


def example_inputs(sampler: SegmentSampler, model_cfg: dict, device) -> dict:
    """Keyword inputs of one small batch of task 0 (fixed seed), to trace the model for structured
    masks and export."""
    b = sampler.sample_task(0, 2, np.random.default_rng(0)).to_torch(device)
    return forward_kwargs(b, model_cfg["prompt"], model_cfg["task_id"])


def forward_kwargs(batch: dict, use_prompt: bool, task_id: bool) -> dict:
    """The model's keyword inputs from a sampled batch."""
    prompt = prompt_of(batch) if use_prompt else None
    return {"states": batch["states"], "actions": batch["actions"], "rtg": batch["returns_to_go"],
            "timesteps": batch["timesteps"], "mask": batch["mask"], "prompt": prompt,
            "task": batch["task"] if task_id else None}


def export_setup(cfg: DictConfig, state: dict) -> tuple[torch.nn.Module, dict, dict]:
    """For ``tools/export.py``: the full model (sizes read from the weights in ``state``, so no
    data is loaded), synthetic example inputs of the right shapes, and the config that builds the
    same full model again."""
    m = dict(cfg.model)
    if m.get("arch", "dt") != "dt":
        raise ConfigError(f"model.arch={m['arch']}: export removes pruned heads and units of the decision "
                          f"transformer (model.arch=dt) only")
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


def play(ev: EvalSpec, model, masks: MaskSet, sampler: SegmentSampler, rtg_target: np.ndarray, envs: list[list], *,
         prompt: bool, task_ids: bool, device, seed_offset: int = 0, policy_factory=GridPolicy) -> EvalReport:
    """Evaluate ``model`` under ``masks`` (one row per task of ``sampler``): prompts, state statistics and
    reward scale from ``sampler``; episode seeds from (eval seed, ``seed_offset`` + task row, episode).
    ``policy_factory(model, rows, masks, prompts, task_ids=…, impl=…)``: the grid policy (``GridPolicy``; MGDT's
    ``ReturnSamplingPolicy``, whose ``on_step`` runs after every step), made once per evaluation."""
    tasks = sampler.tasks
    rows = list(range(len(tasks)))
    prompts = eval_prompts(sampler, device) if prompt else None
    was_training = model.training
    model.eval()
    dense = bool((masks.density() == 1.0).all())  # all-ones masks: one plain batch, no vmap
    policy = policy_factory(model, rows, None if dense else masks, prompts, task_ids=task_ids, impl=ev.policy_impl)
    report = EvalReport([])
    n = ev.parallel
    for first in range(0, ev.episodes, n):
        episodes = list(range(first, min(first + n, ev.episodes)))
        part = run_grid(policy, [row[:len(episodes)] for row in envs], tasks, [seed_offset + r for r in rows],
                        episodes, seed=ev.seed, state_mean=sampler.state_mean, state_std=sampler.state_std,
                        rtg_target=rtg_target, reward_scale=sampler.config.reward_scale,
                        context=sampler.config.context, max_steps=ev.max_steps,
                        stop_on_success=ev.stop_on_success, act_dim=sampler.dataset.act_dim,
                        on_step=getattr(policy, "on_step", None))
        report.episodes += part.episodes
        report.policy_s += part.policy_s
        report.sim_s += part.sim_s
        report.env_steps += part.env_steps
    model.train(was_training)
    return report.summarise()


def make_envs(tasks: list[str], ev: EvalSpec, data=None) -> list[list]:
    """``ev.parallel`` environments of each task, of the benchmark of ``data`` (default: Meta-World,
    goals from ``ev.seed``)."""
    return benchmark_of(data).make_envs(data, tasks, ev)


def evaluate_unseen(ev: EvalSpec, model, masks: MaskSet, demos: OfflineDataset, sampling: SamplingConfig,
                    n_train_tasks: int, device, *, prompt: bool, policy_factory=GridPolicy,
                    data=None) -> tuple[EvalReport, float]:
    """Spec §6: the tasks of ``demos`` were never trained on. Every one of them acts with the voting
    mask of the training tasks' masks (all ones for dense methods). Its prompt, per-task state
    statistics and return-to-go target come from its prompt demonstrations alone. Returns the report
    and the voting mask's density."""
    vote = masks.voting_mask(float(ev.voting_threshold))
    unseen = MaskSet({n: v[None] for n, v in vote.items()}, demos.tasks, [0] * len(demos.tasks))
    sampler = SegmentSampler(OfflineDataset(list(demos.tasks), dict(demos.data), demos), sampling)
    rtg = np.array([np.quantile(demos[t].episode_returns(), ev.rtg_quantile) for t in demos.tasks])
    report = play(ev, model, unseen, sampler, rtg, make_envs(list(demos.tasks), ev, data), prompt=prompt,
                  task_ids=False, device=device, seed_offset=n_train_tasks, policy_factory=policy_factory)
    return report, float(unseen.density().mean())


def build_model(spec: ModelSpec, dataset: OfflineDataset, data_node: DictConfig, ev: EvalSpec, device,
                return_max: float = 1.0) -> torch.nn.Module:
    """The recipes' model of ``spec`` for ``dataset`` (timestep embedding long enough for the data's and
    the evaluation's episodes, unless ``model.max_ep_len`` sets it)."""
    max_ep_len = max(int(data_node.get("episode_length", 500)), ev.max_steps)
    return spec.build(dataset.obs_dim, dataset.act_dim, max_ep_len, len(dataset.tasks), return_max).to(device)


def policy_factory(spec: ModelSpec, ev: EvalSpec):
    """The grid policy of ``spec.arch``: MGDT draws its return-to-go (seeded by the evaluation's
    seed), every other model acts on the given one."""
    if spec.arch != "mgdt":
        return GridPolicy
    from recipes.harmodt.baselines import ReturnSamplingPolicy

    def make(model, rows, masks, prompts, task_ids=False, impl="reference"):
        # eval.policy_impl is the Prompt-DT's; MGDT's forward has no cached path (GridPolicy runs its reference)
        return ReturnSamplingPolicy(model, rows, masks, prompts, task_ids, kappa=spec.expert_kappa, seed=ev.seed)
    return make


IQL_KEYS = [
    ("iql.tau", is_number(0, 1, lo_open=True, hi_open=True), "a number in (0, 1) (the expectile of the value)"),
    ("iql.beta", is_number(0), "a number >= 0 (inverse temperature of the advantage weights)"),
    ("iql.gamma", is_number(0, 1, hi_open=True), "a number in [0, 1) (discount)"),
    ("iql.max_weight", is_number(0, lo_open=True), "a number > 0 (the advantage weights' clip)"),
    ("iql.target_rate", is_number(0, 1, lo_open=True), "a number in (0, 1] (the target critics' EMA rate per step)"),
    ("iql.reward_norm", is_bool, "true or false (rewards x 1000 / each task's return range, as IQL's)"),
]


def iql_settings(cfg: DictConfig, returns: list[np.ndarray], reward_scale: float) -> dict:
    """The MTIQL loss's keyword arguments from ``iql.*`` (``target_rate`` is the step hook's). With
    ``iql.reward_norm``, each task's rewards are scaled as IQL scales a Gym-MuJoCo dataset's, to
    1000 / (its highest − its lowest episode return) in raw units (``returns``: each task's episode
    returns); a task whose returns are all equal keeps raw units."""
    node = OmegaConf.to_container(cfg.iql, resolve=True)
    out = {k: float(node[k]) for k in ("tau", "beta", "gamma", "max_weight")}
    if node["reward_norm"]:
        spread = np.array([float(np.ptp(r)) for r in returns])
        raw = reward_scale * np.where(spread > 0, 1000.0 / np.where(spread > 0, spread, 1.0), 1.0)
        out["reward_mult"] = torch.tensor(raw, dtype=torch.float32)
    return out


def parameter_line(model: torch.nn.Module, cfg: DictConfig) -> str:
    """The model's parameter count, beside the journal's Table VI count when the profile names one."""
    n = sum(p.numel() for p in model.parameters())
    ref = OmegaConf.select(cfg, "model.table_params_m", default=None)
    line = f"model: {type(model).__name__}, {n / 1e6:.3f} M parameters"
    if ref is not None:
        line += f" (journal Table VI: {float(ref):.2f} M, {100 * (n / 1e6 / float(ref) - 1):+.1f} %)"
    return line


class PromptDTSetup:
    """What both Prompt-DT recipes build before training, in this order: the specs, the dataset
    (generated when missing) and its segment sampler, each task's return-to-go target (a quantile of
    its episode returns: experts differ widely), the Prompt-DT, its loss, the generators the run
    checkpoints, and the batches of training steps and mask updates. ``evaluate(masking)``
    evaluates every task with its id and mask (environments built at the first call)."""

    def __init__(self, cfg: DictConfig, ctx: RunContext, *, check_data=None):
        self.train, self.ev, self.spec = (TrainSpec.from_config(cfg.train), EvalSpec.from_config(cfg.eval),
                                          ModelSpec.from_config(cfg.model))
        self.device = ctx.device
        self.data, self.benchmark = cfg.data, benchmark_of(cfg.data)
        self.dataset = self.benchmark.dataset(cfg.data, cfg.data_root)
        self.sampler = SegmentSampler(self.dataset, SamplingConfig.from_config(cfg.data.get("sampling")))
        self.tasks = list(self.dataset.tasks)
        if check_data is not None:  # the recipe's checks of the data, before the model is built
            check_data(self.dataset)
        self.returns = [self.dataset[t].episode_returns() for t in self.tasks]
        self.rtg_target = np.array([np.quantile(r, self.ev.rtg_quantile) for r in self.returns])
        # MGDT's binned returns-to-go span [0, the highest episode return], in training units
        self.return_max = max(float(np.max(r)) for r in self.returns) / self.sampler.config.reward_scale
        self.model = build_model(self.spec, self.dataset, cfg.data, self.ev, self.device, self.return_max)
        self.iql = (iql_settings(cfg, self.returns, self.sampler.config.reward_scale) if self.spec.arch == "iql"
                    else None)
        self.loss_fn = make_loss_fn(self.spec.prompt, self.spec.task_id, self.spec.arch, self.spec.return_loss_weight,
                                    self.return_max, self.iql)
        # the held-out loss: the action MSE of every model (the training loss of dt and mlp; MGDT's actions
        # under the data's returns-to-go, MTIQL's actor), so eval/heldout_mse compares across methods
        self.action_loss_fn = make_loss_fn(self.spec.prompt, self.spec.task_id)
        self.policy_factory = policy_factory(self.spec, self.ev)
        self.generators = {"tasks": make_generator(cfg.seed, 3)}
        self.rngs = {"data": np.random.default_rng([cfg.seed, 2]), "scores": np.random.default_rng([cfg.seed, 4])}
        batch_for, self.score_batches = segment_batches(self.sampler, self.train.batch_size, cfg.masking.grad_batches,
                                                        self.rngs["scores"], self.device)
        self.batch_for = lambda task: batch_for(task, self.rngs["data"])
        self.envs: list[list] = []

    def example_inputs(self) -> dict:
        return example_inputs(self.sampler, asdict(self.spec), self.device)

    def evaluate(self, masking: Masking) -> EvalReport:
        self.envs = self.envs or make_envs(self.tasks, self.ev, self.data)
        return play(self.ev, self.model, masking.masks, self.sampler, self.rtg_target, self.envs,
                    prompt=self.spec.prompt, task_ids=self.spec.task_id, device=self.device,
                    policy_factory=self.policy_factory)


def mean_success(report: EvalReport) -> float:
    return float(np.mean([v["success"] for v in report.per_task.values()]))


def mean_of(report: EvalReport, key: str) -> float:
    """The mean over tasks of one per-task metric (``success`` or ``return``)."""
    return float(np.mean([v[key] for v in report.per_task.values()]))


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
SMOKE_EVAL = dict(MetaWorld.smoke_eval)  # one 40-step episode per task (g_harmodt reads it too)


def smoke_overrides(cfg: DictConfig) -> dict:
    """``debug=smoke``: two tasks of short episodes, a 1-layer d=32 model, one short episode per task
    (Meta-World: 40 steps; locomotion: the data's 10-step episodes)."""
    bench = benchmark_of(cfg.data)
    return bench.smoke_data(cfg.data) | SMOKE_MODEL | dict(bench.smoke_eval)


MODEL_KEYS = [
    ("model.d_model", is_int(1), "an integer >= 1"),
    ("model.n_layer", is_int(1), "an integer >= 1"),
    ("model.n_head", is_int(1), "an integer >= 1"),
    ("model.dropout", is_number(0, 1, hi_open=True), "a number in [0, 1)"),
    ("model.prompt", is_bool, "true or false"),
    ("model.task_id", is_bool, "true or false"),
    ("model.arch", lambda v: v in ARCHS, f"one of {', '.join(ARCHS)} (decision transformer, MTBC's MLP actor, "
                                         f"multi-game DT)"),
    ("model.max_ep_len", lambda v: v is None or is_int(1)(v), "null (the episode length) or an integer >= 1"),
    ("model.mlp_width", is_int(1), "an integer >= 1 (hidden units of the MLP actor)"),
    ("model.mlp_depth", is_int(1), "an integer >= 1 (hidden layers of the MLP actor)"),
    ("model.return_bins", is_int(2), "an integer >= 2 (MGDT's return-to-go classes)"),
    ("model.return_loss_weight", is_number(0), "a number >= 0 (MGDT: weight of the return-class loss)"),
    ("model.expert_kappa", is_number(0), "a number >= 0 (MGDT: the expert tilt exp(kappa R / R_max))"),
    ("model.table_params_m", lambda v: v is None or is_number(0, lo_open=True)(v),
     "null or the journal's parameter count in millions (printed beside the model's)"),
    ("eval.episodes", is_int(1), "an integer >= 1 (episodes per task)"),
    ("eval.parallel", is_int(1), "an integer >= 1 (episodes of a task stepped together)"),
    ("eval.max_steps", is_int(1), "an integer >= 1 (steps per episode; Meta-World: at most 500, locomotion: "
                                  "data.episode_length)"),
    ("eval.stop_on_success", is_bool, "true or false"),
    ("eval.rtg_quantile", is_number(0, 1), "a number in [0, 1] (a quantile of each task's returns)"),
    ("eval.seed", is_int(0), "an integer >= 0"),
    ("eval.policy_impl", lambda v: v in POLICY_IMPLS, f"one of {', '.join(POLICY_IMPLS)}"),
]
HELDOUT_KEYS = [
    ("eval.heldout_batches", is_int(0, 1000), f"an integer in 0..1000 (batches of {HELDOUT_BATCH} held-out segments "
                                              f"per task at every evaluation; 0: no held-out loss)"),
]


def check_model_config(cfg: DictConfig) -> None:
    """The Prompt-DT, evaluation and data keys both Prompt-DT training recipes share (the data's
    through its benchmark's checks)."""
    check_keys(cfg, MODEL_KEYS)
    if cfg.model.d_model % cfg.model.n_head:
        raise ConfigError(f"model.d_model={cfg.model.d_model}: expected a multiple of model.n_head={cfg.model.n_head}")
    benchmark_of(cfg.data).check(cfg)
    if cfg.model.prompt and OmegaConf.select(cfg, "data.sampling.prompt_length", default=1) < 1:
        raise ConfigError("model.prompt=true needs data.sampling.prompt_length >= 1")
    arch = OmegaConf.select(cfg, "model.arch", default="dt")
    rows, steps = OmegaConf.select(cfg, "model.max_ep_len"), max(int(cfg.data.get("episode_length", 500)),
                                                                    int(cfg.eval.max_steps))
    if rows is not None and rows < steps:
        raise ConfigError(f"model.max_ep_len={rows}: the timestep embedding needs a row for each of the {steps} "
                          f"steps of an episode (data.episode_length, eval.max_steps); or set null")
    if arch == "mlp" and cfg.model.prompt:
        raise ConfigError("model.arch=mlp (MTBC's actor) takes no trajectory prompt: set model.prompt=false")
    if arch == "iql" and (cfg.model.prompt or not cfg.model.task_id):
        raise ConfigError("model.arch=iql (MTIQL) has a task-id actor and no prompt: set model.prompt=false and "
                          "model.task_id=true")
    if arch == "mgdt" and (cfg.model.prompt or cfg.model.task_id):
        raise ConfigError("model.arch=mgdt (multi-game DT) is conditioned on neither a prompt nor a task id: set "
                          "model.prompt=false and model.task_id=false")


def check_config(cfg: DictConfig) -> None:
    """Every harmodt key, before any data is generated (recipes/launch.py calls it)."""
    if "gate" in cfg:  # a task-agnostic method file (conf/method/ta_*, g_harmodt) sets gate.*
        raise ConfigError(f"method={cfg.method_name} belongs to recipe=g_harmodt (task-agnostic evaluation); the "
                          f"harmodt recipe's methods are prompt_dt, mtdt, mtdt_mean, pcgrad, cagrad, harmodt_r/m/f, "
                          f"harmodt_random, and mtbc / mgdt / mtiql, each also as _harmodt_f and _random")
    check_model_config(cfg)
    check_keys(cfg, HELDOUT_KEYS + IQL_KEYS)
    heldout = int(OmegaConf.select(cfg, "eval.heldout_batches", default=0) or 0)
    sampling = OmegaConf.select(cfg, "data.sampling.heldout_episodes", default=SamplingConfig.heldout_episodes)
    if heldout and sampling == 0 and int(OmegaConf.select(cfg, "data.prompt_demos", default=0) or 0) < 1:
        raise ConfigError(f"eval.heldout_batches={heldout}: the held-out loss needs episodes no training step reads "
                          f"(data.sampling.heldout_episodes >= 1 or data.prompt_demos >= 1); or set "
                          f"eval.heldout_batches=0")
    bench = benchmark_of(cfg.data)
    unseen = bench.unseen_tasks(cfg.data)
    n_train = len(bench.train_tasks(cfg.data))
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
                          f"embedding for tasks it never trained on; use a prompt-based method, or evaluate the training "
                          f"tasks only (data.unseen_taskset=null data.unseen_tasks=null)")
    if unseen and not (is_number()(cfg.eval.voting_threshold) and 0 < float(cfg.eval.voting_threshold) < n_train):
        raise ConfigError(f"eval.voting_threshold={cfg.eval.voting_threshold}: expected a fraction in (0, 1) "
                          f"or a count in [1, {n_train}) of the training tasks")
    sweep = OmegaConf.select(cfg, "eval.voting_sweep", default=None)
    sweep = [] if sweep is None else sweep
    if not OmegaConf.is_list(sweep) and not isinstance(sweep, (list, tuple)):
        raise ConfigError(f"eval.voting_sweep={sweep}: expected a list of thresholds, e.g. [0.8,0.9] (or [])")
    for t in sweep:
        if not (is_number()(t) and 0 < float(t) < n_train):
            raise ConfigError(f"eval.voting_sweep={list(sweep)}: {t!r} is not a fraction in (0, 1) or a count in "
                              f"[1, {n_train}) of the training tasks")


def heldout_summary(final_held: dict, tasks: list[str], per_task: dict, ev: EvalSpec) -> dict | None:
    """``results.json``'s ``heldout`` (each task's final held-out loss added to ``per_task``)."""
    if not final_held:
        return None
    for t in tasks:
        per_task[t]["heldout_mse"] = final_held[f"eval/{t}/heldout_mse"]
    return {"mse": final_held["eval/heldout_mse"], "mse_init": final_held["eval/heldout_mse_init"],
            "mse_neighbour": final_held["eval/heldout_mse_neighbour"], "batches_per_task": ev.heldout_batches,
            "batch_size": HELDOUT_BATCH}


def unseen_summary(setup: PromptDTSetup, masks: MaskSet, demos: OfflineDataset) -> tuple[dict, tuple]:
    """Spec §6's evaluation of the unseen tasks (voting mask): ``results.json``'s ``unseen`` and the
    table printed under the results (the benchmark's metrics: success and return on Meta-World,
    return on locomotion)."""
    ev, bench = setup.ev, setup.benchmark
    key = bench.headline

    def play_at(threshold: float) -> tuple[EvalReport, float]:
        with evaluation(f"evaluation of the unseen tasks (voting threshold {threshold:g})", len(demos.tasks), ev):
            return evaluate_unseen(replace(ev, voting_threshold=threshold), setup.model, masks, demos,
                                   setup.sampler.config, len(setup.tasks), setup.device, prompt=setup.spec.prompt,
                                   policy_factory=setup.policy_factory, data=setup.data)

    rep, density = play_at(float(ev.voting_threshold))
    result = {"tasks": list(demos.tasks), "voting_threshold": float(ev.voting_threshold), "voting_density": density,
              "per_task": rep.per_task, f"mean_{key}": mean_of(rep, key),
              "episodes": [e.__dict__ for e in rep.episodes], "sweep": []}
    tables = [(float(ev.voting_threshold), density, rep)]
    for threshold in ev.voting_sweep:  # eval.voting_sweep: the same tasks and goals, other voting masks
        rep_t, density_t = play_at(threshold)
        result["sweep"].append({"voting_threshold": threshold, "voting_density": density_t,
                                "per_task": rep_t.per_task, f"mean_{key}": mean_of(rep_t, key)})
        tables.append((threshold, density_t, rep_t))

    def show(threshold: float, density: float, rep: EvalReport):
        return lambda: print_table(f"unseen tasks (voting mask, threshold {threshold:g}, density {density:.4f}): "
                                   f"mean {key} {mean_of(rep, key):.3f}",
                                   {t: {k: v[k] for k in bench.per_task_keys} for t, v in rep.per_task.items()})
    return result, tuple(show(*t) for t in tables)


def unseen_means(result: dict | None, key: str) -> dict[str, float]:
    """The unseen tasks' run-level means for ``results.json``'s ``mean`` (what ``report --metric`` reads):
    ``unseen_<key>`` and ``unseen_density`` at ``eval.voting_threshold``, ``unseen_<key>@<t>`` and
    ``unseen_density@<t>`` at each threshold of ``eval.voting_sweep``."""
    if result is None:
        return {}
    out = {f"unseen_{key}": result[f"mean_{key}"], "unseen_density": result["voting_density"]}
    for row in result.get("sweep", []):
        out |= {f"unseen_{key}@{row['voting_threshold']:g}": row[f"mean_{key}"],
                f"unseen_density@{row['voting_threshold']:g}": row["voting_density"]}
    return out


def run(cfg: DictConfig) -> dict | None:
    # ------------------------------------------------------------------ build
    ctx = RunContext.start(cfg)
    check_config(cfg)  # also run by recipes/launch.py before the run folder is touched
    bench: Benchmark = benchmark_of(cfg.data)
    key = bench.headline  # success (Meta-World) | return (locomotion)
    unseen = bench.unseen_tasks(cfg.data)
    setup = PromptDTSetup(cfg, ctx)
    unseen_demos = bench.unseen_demos(cfg.data, cfg.data_root, unseen) if unseen else None
    train, ev, model, tasks, loss_fn = setup.train, setup.ev, setup.model, setup.tasks, setup.loss_fn
    masking = Masking(cfg, model, tasks, make_generator(cfg.seed, 1), example_inputs=setup.example_inputs())
    held = heldout_batches(setup.sampler, ev.heldout_batches, ctx.device) if ev.heldout_batches else None
    multi = multi_task_step(train, cfg.seed, model, masking, len(tasks))  # None unless train.gradient=mean|pcgrad|cagrad
    report_masking(model, masking)
    print(parameter_line(model, cfg))
    if ctx.dry_run:
        return None
    initial = None  # the initial masks' model, after the restore

    def evaluate_now(label: str) -> tuple[EvalReport, float, dict]:
        """One evaluation of every task, its mean headline metric (success or return) and the
        held-out metrics (none without eval.heldout_batches)."""
        with evaluation(label, len(tasks), ev) as shown:
            rep = setup.evaluate(masking)
            held_now = {} if held is None else heldout_metrics(
                tasks, heldout_mse(model, setup.action_loss_fn, held, heldout_forwards(masking, initial)))
            shown.result = f"mean {key} {mean_of(rep, key):.3f}" + (
                f", held-out mse {held_now['eval/heldout_mse']:.4g}" if held_now else "")
        return rep, mean_of(rep, key), held_now

    def evaluate_at(step: int) -> Evaluation:
        rep, mean, held_now = evaluate_now(f"evaluation at step {step}")
        metrics = ({f"eval/{t}/{key}": v[key] for t, v in rep.per_task.items()} | held_now
                   | {f"eval/mean_{key}": mean, "time/eval_policy_s": rep.policy_s, "time/eval_sim_s": rep.sim_s})
        return Evaluation(metrics, mean, rep.per_task)

    on_step = None
    if setup.spec.arch == "iql":  # MTIQL: the target critics follow the critics after every step
        rate = float(cfg.iql.target_rate)
        on_step = lambda step, metrics: model.update_targets(rate)  # noqa: E731
    loop = TrainLoop(ctx, train, model=model, masking=masking, loss_fn=loss_fn, batch_for=setup.batch_for,
                     score_batches=setup.score_batches, numpy_rngs=setup.rngs, multi=multi, evaluate=evaluate_at,
                     on_step=on_step,
                     generators=setup.generators | (multi.generators if multi else {}), best_key=f"mean_{key}")
    loop.restore()
    initial = MaskedModel(model, initial_masks(masking)) if held is not None else None  # after the restore

    # ------------------------------------------------------------------ train, evaluate, finish
    loop.train()
    final, final_mean, final_held = evaluate_now(f"final evaluation after {train.steps} steps")
    loop.keep_best(train.steps, final_mean, final.per_task)
    loop.log(train.steps, {f"eval/{t}/{key}": v[key] for t, v in final.per_task.items()}
             | {f"eval/mean_{key}": final_mean} | final_held)
    best = loop.best
    per_task = {t: {k: v[k] for k in bench.per_task_keys} | {f"best_{key}": best["per_task"][t][key]}
                for t, v in final.per_task.items()}
    heldout_result = heldout_summary(final_held, tasks, per_task, ev)
    unseen_result, reports = unseen_summary(setup, masking.masks, unseen_demos) if unseen_demos else (None, ())
    return loop.finish(
        cfg, per_task=per_task, headline=key, reports=reports, means=unseen_means(unseen_result, key), title=f"harmodt {cfg.method_name} seed {cfg.seed}",
        table=f"harmodt ({cfg.method_name}): {key} after {train.steps} steps "
              f"(best = the evaluation with the highest mean {key})",
        extra={"method": cfg.method_name, "benchmark": bench.name, "best": best,
               "rtg_target": dict(zip(tasks, setup.rtg_target.tolist())),
               "episodes": [e.__dict__ for e in final.episodes], "density": masking.masks.density().tolist(),
               "resumed_from": loop.resumed_from, "unseen": unseen_result, "heldout": heldout_result})
