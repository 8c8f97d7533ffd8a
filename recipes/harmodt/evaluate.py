"""Batched evaluation of a (masked) Prompt Decision Transformer (Meta-World and locomotion tasks).

All tasks are evaluated at once: ``parallel`` episodes of every task step together, arranged as a
(T tasks, n envs) grid, and each environment step costs one policy call for the whole grid. With
task masks, the masked parameters θ⊙M of each task are stacked once per evaluation and
``torch.func.vmap`` maps the forward over the task axis (each task's n envs form the inner batch),
so every env acts with its own task's mask and prompt. Without masks (dense, MTDT) the grid is one
plain batch.

An episode succeeds if ``info["success"]`` was ever true; environments without a success signal
(the locomotion tasks: no ``"success"`` in ``info``) have ``success`` None and are scored by their
return alone. ``stop_on_success`` ends an env's episode at its first success (enough for success
rates; returns then count only the steps played). An episode also ends when its environment says
``terminated`` or ``truncated`` (the ant falling over); its return counts the steps played.
The return-to-go starts at each task's own target (``rtg_target``, raw reward units, e.g. a high
quantile of the task's data returns) and decreases by each reward, both divided by
``reward_scale`` as in training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from maskmtl import MaskSet
from recipes.common import phase


@dataclass(frozen=True)
class EvalSpec:
    """The ``eval.*`` keys of the Prompt-DT recipes, read once (checked by the recipes' ``check_config``).

    episodes / parallel: episodes per task, and how many of them step together; max_steps: the
    episode length; stop_on_success: an env stops at its first success; rtg_quantile: the
    return-to-go target, a quantile of the data returns; seed: the evaluation goals;
    heldout_batches: batches of held-out segments per task for the held-out loss (0: none);
    voting_threshold: the voting mask of unseen tasks (voting_sweep: more thresholds they are also
    played at); task_provided: G-HarmoDT's final
    evaluation with the task id, for reference; policy_impl: how the policy computes its forward
    (``GridPolicy``'s ``impl``)."""

    episodes: int
    parallel: int
    max_steps: int
    stop_on_success: bool
    rtg_quantile: float
    seed: int
    heldout_batches: int = 0
    voting_threshold: float | None = None
    voting_sweep: tuple[float, ...] = ()
    task_provided: bool = False
    policy_impl: str = "reference"

    @classmethod
    def from_config(cls, ev) -> "EvalSpec":
        from omegaconf import OmegaConf

        e = OmegaConf.to_container(ev, resolve=True)
        return cls(episodes=int(e["episodes"]), parallel=int(e["parallel"]), max_steps=int(e["max_steps"]),
                   stop_on_success=bool(e["stop_on_success"]), rtg_quantile=e["rtg_quantile"], seed=int(e["seed"]),
                   heldout_batches=int(e.get("heldout_batches") or 0), voting_threshold=e.get("voting_threshold"),
                   voting_sweep=tuple(float(t) for t in (e.get("voting_sweep") or ())),
                   task_provided=bool(e.get("task_provided", False)),
                   policy_impl=str(e.get("policy_impl") or "reference"))


@dataclass
class EpisodeResult:
    task: str
    episode: int
    seed: int
    success: bool | None  # None: the environment has no success signal
    ret: float
    steps: int


@dataclass
class EvalReport:
    episodes: list[EpisodeResult]
    policy_s: float = 0.0
    sim_s: float = 0.0
    env_steps: int = 0
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)

    def summarise(self) -> "EvalReport":
        for task in dict.fromkeys(e.task for e in self.episodes):
            eps = [e for e in self.episodes if e.task == task]
            row = {"success": float(np.mean([e.success for e in eps]))} if eps[0].success is not None else {}
            self.per_task[task] = row | {"return": float(np.mean([e.ret for e in eps])), "episodes": float(len(eps))}
        return self


def episode_seed(seed: int, task_index: int, episode: int) -> int:
    """The seed of one evaluation episode (goal and object positions): fixed per (task, episode)."""
    return int(np.random.default_rng([int(seed), int(task_index), int(episode), 7]).integers(2**31 - 1))


POLICY_IMPLS = ("reference", "cached", "cached_loop")


class CallMethod(torch.nn.Module):
    """``functional_call`` calls a module's forward; this one's forward is one method of ``model``
    (its parameters are ``model.<name>``)."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


class GridPolicy:
    """One forward for a (T, n) grid of envs, each task with its own mask, prompt and task id.

    Args:
        model: a ``PromptDT``, or any model with its forward signature (recipes/harmodt/baselines.py).
        tasks: task index (into ``masks.tasks`` / the prompt rows) of each grid row.
        masks: per-task masks, or ``None`` for a dense model.
        prompt: tuple (states, actions, rtg, timesteps, mask) with leading dim T, or ``None``.
        task_ids: pass the task index to the model (MTDT).
        impl: ``eval.policy_impl``. ``reference``: the full forward of every position of prompt and
            window at each step, vmapped over the task masks. ``cached``: each task's prompt is
            encoded once (``PromptDT.encode_prompt``, under its mask) and only the last state's
            output is computed in the last block; vmapped over the task masks. ``cached_loop``: the
            same, with a loop of per-task forwards in place of the vmap. All three compute the same
            function; the cached ones differ from the reference by float rounding (~1e-7 here).
            Models without ``encode_prompt`` (the baselines) always run the reference forward.
    """

    def __init__(self, model: torch.nn.Module, tasks: Sequence[int], masks: MaskSet | None = None,
                 prompt: tuple | None = None, task_ids: bool = False, impl: str = "reference"):
        if impl not in POLICY_IMPLS:
            raise ValueError(f"eval.policy_impl={impl!r}: expected one of {', '.join(POLICY_IMPLS)}")
        if not hasattr(model, "encode_prompt"):
            impl = "reference"  # only the Prompt-DT has the cached forward (the baselines: their own)
        self.device = next(model.parameters()).device  # inputs arrive on the CPU (numpy) and move here
        self.model, self.masks, self.task_ids, self.impl = model, masks, task_ids, impl
        self.prompt = None if prompt is None else tuple(p.to(self.device) for p in prompt)
        self.tasks = torch.tensor(list(tasks), dtype=torch.long, device=self.device)
        self.stacked = None
        if masks is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                self.stacked = {n: torch.stack([torch.where(masks[n][masks.group_of(int(t))], params[n], 0.0)
                                                for t in tasks]) for n in masks.names}  # (T, *P)
        self.prefix = None  # cached: each grid row's encoded prompt, (T, n_layer, 1, nh, 3K*, hs) ...
        if impl != "reference" and self.prompt is not None:
            self.prefix = self._encode_prompts()

    @torch.inference_mode()
    def _encode_prompts(self) -> tuple:
        rows = tuple(p[:, None] for p in self.prompt)  # (T, 1, K*, ·): one prompt per grid row
        if self.stacked is None:
            keys, values, keep = self.model.encode_prompt(self.prompt)  # (n_layer, T, ...), (T, 3K*)
            return keys.transpose(0, 1)[:, :, None], values.transpose(0, 1)[:, :, None], keep[:, None]
        enc = CallMethod(self.model, "encode_prompt")

        def one(params, prompt):
            return functional_call(enc, {f"model.{n}": v for n, v in params.items()}, (prompt,))
        if self.impl == "cached_loop":
            outs = [one({n: v[i] for n, v in self.stacked.items()}, tuple(p[i] for p in rows))
                    for i in range(len(self.tasks))]
            return tuple(torch.stack(x) for x in zip(*outs))
        return vmap(one)(self.stacked, rows)

    def _kwargs(self, prompt, prefix, extra: dict, fused: bool = False) -> dict:
        """The model's keyword arguments: the prompt, or its encoded prefix (at the batch's size),
        and the last step only for the cached implementations."""
        kwargs = {"prompt": prompt} if prefix is None else {"prefix": prefix}
        if self.impl != "reference":
            kwargs["last"] = True
            if fused:
                kwargs["fused_attention"] = True
        return kwargs | extra

    def _one(self, params, task, states, actions, rtg, timesteps, mask, prompt, prefix, extra, fused=False):
        # one task's n envs: states (n, K, S) …; prompt tensors (n, K*, …); prefix: its encoded prompt (batch 1)
        n = states.shape[0]
        if prefix is not None:
            keys, values, keep = prefix
            prefix = (keys.expand(-1, n, -1, -1, -1), values.expand(-1, n, -1, -1, -1), keep.expand(n, -1))
        kwargs = self._kwargs(prompt, prefix, extra, fused)
        if self.task_ids:
            kwargs["task"] = task.expand(n)
        if params is None:
            return self.model(states, actions, rtg, timesteps, mask, **kwargs)
        return functional_call(self.model, params, (states, actions, rtg, timesteps, mask), kwargs)

    def forward(self, states, actions, rtg, timesteps, mask, **extra):
        """Inputs (T, n, K, ·); returns the model's output for every step, (T, n, K, ·), or for the
        last step only, (T, n, 1, ·), with the cached implementations. ``extra``: more keyword
        arguments of the model's forward."""
        states, actions, rtg, timesteps, mask = (x.to(self.device, non_blocking=True)
                                                 for x in (states, actions, rtg, timesteps, mask))
        t, n = states.shape[:2]
        prompt = None
        if self.prompt is not None and self.prefix is None:
            prompt = tuple(p[:, None].expand(-1, n, *p.shape[1:]) for p in self.prompt)  # (T, n, K*, ·)
        if self.stacked is None:  # dense: the grid is one batch
            flat = lambda x: x.reshape(t * n, *x.shape[2:])  # noqa: E731
            prefix = None
            if self.prefix is not None:  # (T, n_layer, 1, nh, L, hs) ... -> (n_layer, T·n, nh, L, hs) ...
                keys, values, keep = self.prefix
                grid = lambda x: x.expand(-1, -1, n, *x.shape[3:]).transpose(0, 1).reshape(  # noqa: E731
                    x.shape[1], t * n, *x.shape[3:])
                prefix = (grid(keys), grid(values), keep.expand(-1, n, -1).reshape(t * n, -1))
            kwargs = self._kwargs(tuple(flat(p) for p in prompt) if prompt is not None else None, prefix, extra)
            if self.task_ids:
                kwargs["task"] = self.tasks.repeat_interleave(n)
            out = self.model(flat(states), flat(actions), flat(rtg), flat(timesteps), flat(mask), **kwargs)
            return out.reshape(t, n, *out.shape[1:])
        if self.impl == "cached_loop":
            return torch.stack([self._one({name: v[i] for name, v in self.stacked.items()}, self.tasks[i], states[i],
                                          actions[i], rtg[i], timesteps[i], mask[i],
                                          None if prompt is None else tuple(p[i] for p in prompt),
                                          None if self.prefix is None else tuple(x[i] for x in self.prefix),
                                          extra, fused=True) for i in range(t)])
        one = lambda *a: self._one(*a, extra)  # noqa: E731
        # no prompt (MTDT, MTBC, MGDT) or no prefix: nothing to map over
        in_dims = (0,) * 7 + (None if prompt is None else 0, None if self.prefix is None else 0)
        return vmap(one, in_dims=in_dims)(self.stacked, self.tasks, states, actions, rtg, timesteps, mask, prompt,
                                          self.prefix)

    @torch.inference_mode()
    def __call__(self, states, actions, rtg, timesteps, mask) -> torch.Tensor:
        """Inputs (T, n, K, ·); returns the action for the last step, (T, n, A)."""
        return self.forward(states, actions, rtg, timesteps, mask)[:, :, -1]


@dataclass
class GridHistory:
    """What a (T, n) grid has played so far, handed to ``run_grid``'s ``on_step`` hook.

    ``states`` (T, n, max_steps, S) normalised with ``state_mean``/``state_std`` (T, 1, S);
    ``actions`` (T, n, max_steps, A); ``rewards`` (T, n, max_steps) raw; ``rtg`` (T, n, max_steps, 1)
    divided by ``reward_scale``; ``done`` (T, n) bool; ``steps`` (T, n) steps played. Step t is filled once the hook for t runs;
    states and rtg also hold step t + 1. The hook may rewrite ``rtg`` (e.g. a new return target).
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    rtg: np.ndarray
    done: np.ndarray
    steps: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray
    reward_scale: float


def run_grid(policy: Callable, envs: list[list], task_names: Sequence[str], task_index: Sequence[int],
             episode_ids: Sequence[int], *, seed: int, state_mean: np.ndarray, state_std: np.ndarray,
             rtg_target: np.ndarray, reward_scale: float, context: int, max_steps: int,
             stop_on_success: bool, act_dim: int | None = None,
             on_step: Callable[[int, GridHistory], None] | None = None) -> EvalReport:
    """Play one episode in every env of the (T, n) grid, all stepping together.

    ``envs[i][j]`` plays episode ``episode_ids[j]`` of task ``task_names[i]``; an env has
    ``seed(s)``, ``reset() -> (obs, info)`` and ``step(a) -> (obs, r, terminated, truncated, info)``.
    ``state_mean``/``state_std``/``rtg_target`` have one row per grid row; the observation size is
    the statistics' and the action size ``act_dim`` (default: the first env's ``action_space``). ``on_step(t, history)``, if given, runs
    after every env has played step t (0-based), before the policy acts for step t + 1: it may
    change what the policy does next (e.g. route envs to other parameters) and rewrite ``rtg``.
    """
    t_rows, n = len(envs), len(envs[0])
    obs_dim = state_mean.shape[-1]
    act_dim = int(act_dim if act_dim is not None else envs[0][0].action_space.shape[0])
    states = np.zeros((t_rows, n, max_steps, obs_dim), np.float32)
    actions = np.zeros((t_rows, n, max_steps, act_dim), np.float32)
    rtg = np.zeros((t_rows, n, max_steps, 1), np.float32)
    rewards = np.zeros((t_rows, n, max_steps), np.float32)
    ret = np.zeros((t_rows, n))
    success = np.zeros((t_rows, n), bool)
    signal = np.zeros((t_rows, n), bool)  # the env reports success (Meta-World) or not (locomotion)
    done = np.zeros((t_rows, n), bool)
    steps = np.zeros((t_rows, n), np.int64)
    seeds = np.zeros((t_rows, n), np.int64)
    mean, std = state_mean[:, None].astype(np.float32), state_std[:, None].astype(np.float32)
    for i in range(t_rows):
        for j in range(n):
            seeds[i, j] = episode_seed(seed, task_index[i], episode_ids[j])
            envs[i][j].seed(int(seeds[i, j]))
            obs, _ = envs[i][j].reset()
            states[i, j, 0] = obs
    states[:, :, 0] = (states[:, :, 0] - mean) / std
    rtg[:, :, 0, 0] = (rtg_target / reward_scale)[:, None]
    report = EvalReport([])
    history = GridHistory(states, actions, rewards, rtg, done, steps, mean, std, reward_scale)
    first, last = min(episode_ids) + 1, max(episode_ids) + 1
    label = f"episode{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''} of {t_rows} tasks"
    # off a terminal: a line at least every PROGRESS_INTERVAL_S, and an end line when it was that long
    with phase(label, max_steps, unit="steps", fraction=None, announce="long") as bar:
        for t in range(max_steps):
            lo = max(0, t + 1 - context)
            k = t + 1 - lo
            pad = context - k
            # (T, n, K, ·) windows of the last K steps, left-padded; the current action is still zero
            win = lambda x: np.concatenate([np.zeros((t_rows, n, pad, x.shape[-1]), np.float32),  # noqa: E731
                                            x[:, :, lo:t + 1]], 2)
            timesteps = np.concatenate([np.zeros(pad, np.int64), np.arange(lo, t + 1)])
            mask = np.concatenate([np.zeros(pad, bool), np.ones(k, bool)])
            t0 = time.perf_counter()
            act = policy(torch.from_numpy(win(states)), torch.from_numpy(win(actions)), torch.from_numpy(win(rtg)),
                         torch.from_numpy(np.broadcast_to(timesteps, (t_rows, n, context)).copy()),
                         torch.from_numpy(np.broadcast_to(mask, (t_rows, n, context)).copy()))
            act = np.clip(act.float().cpu().numpy(), -1.0, 1.0)  # (T, n, A)
            t1 = time.perf_counter()
            actions[:, :, t] = act
            for i in range(t_rows):
                for j in range(n):
                    if done[i, j]:
                        continue
                    obs, r, terminated, truncated, info = envs[i][j].step(act[i, j])
                    report.env_steps += 1
                    ret[i, j] += r
                    rewards[i, j, t] = r
                    steps[i, j] += 1
                    if "success" in info:
                        signal[i, j] = True
                        success[i, j] |= bool(info["success"])
                    if t + 1 < max_steps:
                        states[i, j, t + 1] = (obs - mean[i, 0]) / std[i, 0]
                        rtg[i, j, t + 1, 0] = rtg[i, j, t, 0] - r / reward_scale
                    if (stop_on_success and success[i, j]) or terminated or truncated:
                        done[i, j] = True
            report.policy_s += t1 - t0
            report.sim_s += time.perf_counter() - t1
            if on_step is not None:
                on_step(t, history)
            bar.advance(info=f"{int((~done).sum())}/{t_rows * n} envs playing")
            if done.all():
                break
    for i in range(t_rows):
        for j in range(n):
            report.episodes.append(EpisodeResult(task_names[i], int(episode_ids[j]), int(seeds[i, j]),
                                                 bool(success[i, j]) if signal[i, j] else None, float(ret[i, j]),
                                                 int(steps[i, j])))
    return report


# ---------------------------------------------------------------------------------- held-out loss
# The action MSE of the training loss on segments no training step ever reads: the sampler's held-out
# episodes of each task (its top-return episodes, or its prompt demonstrations when the data has them).
# The segments are drawn once, at the start of a run, from a generator seeded by a constant and the
# task's name (the same segments for a task whatever the task list, the seed or the method); no
# training random stream is read, so a resumed run draws the same ones and training is unchanged.

HELDOUT_SEED = 20240715  # a constant: the held-out segments do not depend on the training seed
HELDOUT_BATCH = 64       # segments per held-out batch


def heldout_index(sampler, task: int, n: int, rng: np.random.Generator):
    """``n`` segments of task row ``task`` from its held-out episodes (a ``SegmentIndex``).

    As in training, a segment starts at a transition drawn uniformly over the pool's transitions and
    is cut at its episode's end; its prompt follows ``data.sampling``'s rule over the same held-out
    episodes. With ``prompt_episode=best`` and more than one held-out episode the best one (every
    prompt's source) gives no segments, and with ``random`` a segment's prompt comes from another
    held-out episode than its own, so no segment's actions are in its own prompt."""
    from recipes.metaworld.sampler import SegmentIndex

    cfg = sampler.config
    pool = np.asarray(sampler.heldout[sampler.tasks[task]], np.int64)  # the task's episode space, best first
    if len(pool) == 0:
        raise ValueError(f"task {sampler.tasks[task]}: no held-out episodes (data.sampling.heldout_episodes=0 "
                         f"and no data.prompt_demos)")
    lengths = sampler._ep_len[sampler._ep_offset[task] + pool]
    seg = np.arange(1, len(pool)) if cfg.prompt_episode == "best" and len(pool) > 1 else np.arange(len(pool))
    cum = np.cumsum(lengths[seg])
    flat = rng.integers(int(cum[-1]), size=n)
    pos = np.searchsorted(cum, flat, side="right")                   # which held-out episode
    start = flat - (cum[pos] - lengths[seg][pos])                     # step within it
    which = seg[pos]                                                  # index into pool
    if cfg.prompt_episode == "best":
        prompt = np.zeros(n, np.int64)
    elif len(pool) > 1:
        prompt = rng.integers(len(pool) - 1, size=n)
        prompt += prompt >= which                                     # any held-out episode but the segment's
    else:
        prompt = np.zeros(n, np.int64)
    k_star, p_len = cfg.prompt_length, lengths[prompt]
    if cfg.prompt_position == "last":
        p_start = np.maximum(p_len - k_star, 0)
    else:
        p_start = (rng.random(n) * np.maximum(p_len - k_star + 1, 1)).astype(np.int64)
    return SegmentIndex(np.full(n, task, np.int64), pool[which], start.astype(np.int64), pool[prompt],
                        p_start.astype(np.int64))


def heldout_batches(sampler, n_batches: int, device, batch_size: int = HELDOUT_BATCH) -> list[list[dict]]:
    """Per task row, ``n_batches`` fixed batches of ``batch_size`` held-out segments (torch, on ``device``)."""
    import zlib

    out = []
    for i, name in enumerate(sampler.tasks):
        rng = np.random.default_rng([HELDOUT_SEED, zlib.crc32(name.encode())])
        out.append([sampler.gather(heldout_index(sampler, i, batch_size, rng)).to_torch(device)
                    for _ in range(n_batches)])
    return out


@torch.no_grad()
def heldout_mse(model: torch.nn.Module, loss_fn, batches: list[list[dict]], forwards: dict[str, Callable]) -> dict:
    """The loss (``loss_fn(forward, task, batch)``, the training loss) of every task row's held-out
    ``batches``, dropout off, under each mask choice of ``forwards``: name -> ``forward_for(task)``
    (a callable forward for that task's row). Returns name -> per-task list of the mean over batches."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for name, forward_for in forwards.items():
            out[name] = [float(np.mean([float(loss_fn(forward_for(i), i, b)) for b in task_batches]))
                         for i, task_batches in enumerate(batches)]
    finally:
        model.train(was_training)
    return out
