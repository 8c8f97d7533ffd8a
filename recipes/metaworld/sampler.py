"""Prompt Decision Transformer batches from an :class:`OfflineDataset`, vectorised over the batch.

A training sample of task t is a K-step segment of one of t's *training* episodes plus a K*-step
trajectory prompt from one of t's *held-out* episodes:

* Prompt episodes: if the dataset carries separate demonstrations (``dataset.demos``, generated
  with ``data.prompt_demos``), all of them, and every data episode trains. Otherwise, per task,
  the ``heldout_episodes`` highest-return episodes (ties: earlier episode first) are set aside and
  never used for training segments. Either way the prompt never shows the model a trajectory it
  is also trained to imitate (the published code trains on its prompt episodes too). Setting the
  best episodes aside costs the training data its best examples, which matters where they are
  rare (sub-optimal data of hard tasks), hence the separate demonstrations.
* Segment: a start transition is drawn uniformly over the task's training transitions (this is the
  published "episode ∝ length, then a uniform start" rule); the segment is steps
  ``start .. start+K-1`` of its episode, cut at the episode's end.
* Prompt: ``prompt_episode`` = ``best`` (the top-return held-out episode) or ``random`` (uniform
  over held-out episodes); ``prompt_position`` = ``last`` (its last K* steps, the spec's default)
  or ``random`` (a uniform window of K* steps).

Short segments/prompts are left-padded (real steps at the end, as in the Decision Transformer):
padded positions hold zeros everywhere and ``mask`` is False there. States are normalised with
each task's mean/std (``state_norm=task``), pooled statistics (``all``) or not at all (``none``);
rewards and returns-to-go are divided by ``reward_scale``. ``hide_goal`` zeroes the goal
position (obs[36:39]) as Meta-World's ML benchmarks do; its normalisation is then mean 0, std 1,
so an environment observation with the goal zeroed normalises to the same 0. The return-to-go at step t is the sum of
the episode's rewards from t to its end (undiscounted), before scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from recipes.metaworld.storage import DatasetError, OfflineDataset

STD_EPS = 1e-6  # added to the state std (constant dimensions, as in the published code)
GOAL = slice(36, 39)  # Meta-World 3.x goal position in the 39-d observation


@dataclass(frozen=True)
class SamplingConfig:
    """Keys of a ``data.sampling`` config node."""

    context: int = 20
    prompt_length: int = 5
    heldout_episodes: int = 5
    prompt_episode: str = "best"
    prompt_position: str = "last"
    state_norm: str = "task"
    reward_scale: float = 1000.0
    hide_goal: bool = False

    def __post_init__(self):
        choices = {"prompt_episode": ("best", "random"), "prompt_position": ("last", "random"),
                   "state_norm": ("task", "all", "none")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.sampling.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.context < 1 or self.prompt_length < 0 or self.reward_scale <= 0:
            raise ValueError(f"data.sampling: need context >= 1, prompt_length >= 0, reward_scale > 0; got {self}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "SamplingConfig":
        node = dict(node or {})
        unknown = set(node) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"data.sampling: unknown keys {sorted(unknown)}")
        return cls(**node)


@dataclass
class SegmentIndex:
    """Which steps a batch holds; all arrays (B,) int64, episodes indexed within their task's episode
    space (data episodes 0..E-1, then its demonstrations E..E+P-1)."""

    task: np.ndarray
    episode: np.ndarray
    start: np.ndarray
    prompt_episode: np.ndarray
    prompt_start: np.ndarray


@dataclass
class Batch:
    """A batch of B segments of K steps and their K*-step prompts.

    Shapes: ``states`` (B, K, D) float32, ``actions`` (B, K, A) float32, ``rewards`` (B, K, 1)
    float32, ``returns_to_go`` (B, K, 1) float32, ``timesteps`` (B, K) int64 (step within the
    episode), ``mask`` (B, K) bool (True on real steps), ``task`` (B,) int64; ``prompt_*`` the same
    with K* in place of K.
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    returns_to_go: np.ndarray
    timesteps: np.ndarray
    mask: np.ndarray
    task: np.ndarray
    prompt_states: np.ndarray
    prompt_actions: np.ndarray
    prompt_rewards: np.ndarray
    prompt_returns_to_go: np.ndarray
    prompt_timesteps: np.ndarray
    prompt_mask: np.ndarray

    def to_torch(self, device="cpu") -> dict:
        import torch

        return {f.name: torch.from_numpy(getattr(self, f.name)).to(device) for f in fields(self)}


def heldout_episodes(returns: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest-return episodes, best first (stable: earlier episode wins ties)."""
    return np.argsort(-np.asarray(returns), kind="stable")[:n]


def normalisation(dataset: OfflineDataset, mode: str, hide_goal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-task state mean and std, each (T, D) float64 (rows equal for ``all``; 0 / 1 for ``none``
    and for the goal dimensions when ``hide_goal``)."""
    n_tasks, dim = len(dataset.tasks), dataset.obs_dim
    if mode == "none":
        means, stds = np.zeros((n_tasks, dim)), np.ones((n_tasks, dim))
    elif mode == "all":
        obs = np.concatenate([dataset[t].observations for t in dataset.tasks]).astype(np.float64)
        means, stds = np.tile(obs.mean(0), (n_tasks, 1)), np.tile(obs.std(0) + STD_EPS, (n_tasks, 1))
    else:
        means = np.stack([dataset[t].observations.astype(np.float64).mean(0) for t in dataset.tasks])
        stds = np.stack([dataset[t].observations.astype(np.float64).std(0) + STD_EPS for t in dataset.tasks])
    if hide_goal:
        means[:, GOAL], stds[:, GOAL] = 0.0, 1.0
    return means, stds


class SegmentSampler:
    """Vectorised sampler (see the module docstring). Task ids follow ``dataset.tasks``.

    It keeps its own flat copy of every task (normalised float32 states, actions, scaled rewards and
    returns-to-go and indices, ~200 bytes per transition at D=39): drop the dataset after building it when
    memory is tight (MT50 at the papers' 1M transitions per task is ~10 GB).
    """

    def __init__(self, dataset: OfflineDataset, config: SamplingConfig = SamplingConfig()):
        self.dataset, self.config = dataset, config
        self.tasks = list(dataset.tasks)
        self.state_mean, self.state_std = normalisation(dataset, config.state_norm, config.hide_goal)  # (T, D)
        obs, act, rew, rtg, ep_begin, ep_len, row_episode = [], [], [], [], [], [], []
        train_rows, heldout, self.heldout = [], [], {}
        n_rows = n_eps = 0
        self._ep_offset = np.zeros(len(self.tasks), np.int64)
        pool_count = []
        for i, task in enumerate(self.tasks):
            d = dataset[task]
            demo = dataset.demos[task] if dataset.demos is not None else None
            if demo is None and d.n_episodes <= config.heldout_episodes:
                raise DatasetError(f"task {task}: {d.n_episodes} episodes, cannot hold out "
                                   f"data.sampling.heldout_episodes={config.heldout_episodes} and still train")
            # the task's episode space: its data's episodes 0..E-1, then its demonstrations E..E+P-1
            observations, actions, rewards, starts = _episode_space(d, demo)
            states = ((observations - self.state_mean[i]) / self.state_std[i]).astype(np.float32)
            if config.hide_goal:
                states[:, GOAL] = 0.0
            obs.append(states)
            act.append(actions)
            rew.append(rewards)
            # return-to-go as suffix sums inside each episode: with c = cumsum(r) over the task,
            # R_t = c[end-1] - c[t] + r_t for t in [start, end)
            r64 = rewards.astype(np.float64)
            csum = np.cumsum(r64)
            ends, starts = starts[1:], starts[:-1]
            lengths = ends - starts
            rtg.append((np.repeat(csum[ends - 1], lengths) - csum + r64).astype(np.float32))
            self._ep_offset[i] = n_eps
            ep_begin.append(starts + n_rows)
            ep_len.append(lengths)
            row_episode.append(np.repeat(np.arange(len(lengths)) + n_eps, lengths))
            if demo is None:  # the top-return episodes of the data, set aside
                held = heldout_episodes(d.episode_returns(), config.heldout_episodes)
                train = np.setdiff1d(np.arange(d.n_episodes), held)
            else:  # every demonstration, best first; all of the data trains
                held = d.n_episodes + heldout_episodes(demo.episode_returns(), demo.n_episodes)
                train = np.arange(d.n_episodes)
            self.heldout[task] = held
            heldout.append(held + n_eps)
            pool_count.append(len(held))
            train_rows.append(np.concatenate([np.arange(starts[e], ends[e]) for e in train]) + n_rows)
            n_rows += len(rewards)
            n_eps += len(lengths)
        scale = np.float32(config.reward_scale)
        self._obs = np.concatenate(obs)                          # (N, D) normalised states
        self._act = np.concatenate(act)                          # (N, A)
        self._rew = np.concatenate(rew) / scale                  # (N,)
        self._rtg = np.concatenate(rtg) / scale                  # (N,)
        self._ep_begin = np.concatenate(ep_begin)                # (E_all,) first row of each episode
        self._ep_len = np.concatenate(ep_len)                    # (E_all,)
        self._row_episode = np.concatenate(row_episode)          # (N,) global episode of each row
        self._train_rows = np.concatenate(train_rows)            # training rows, grouped by task
        self._train_count = np.array([len(r) for r in train_rows])
        self._train_offset = np.concatenate([[0], np.cumsum(self._train_count)[:-1]])
        self._heldout = np.concatenate(heldout)                  # prompt episodes, best first per task
        self._heldout_count = np.array(pool_count)
        if config.prompt_length > 0 and not self._heldout_count.all():
            raise DatasetError("prompts need episodes to come from: data.sampling.heldout_episodes >= 1 "
                               "or demonstrations (data.prompt_demos)")
        self._heldout_offset = np.concatenate([[0], np.cumsum(pool_count)[:-1]]).astype(np.int64)

    # ---------------------------------------------------------------- which steps
    def draw(self, task: np.ndarray, rng: np.random.Generator) -> SegmentIndex:
        """Draw segment starts and prompt windows for tasks ``task`` (B,) (see the module docstring)."""
        task = np.asarray(task, np.int64)
        pos = self._train_offset[task] + (rng.random(len(task)) * self._train_count[task]).astype(np.int64)
        row = self._train_rows[pos]
        g = self._row_episode[row]
        n_pool = self._heldout_count[task]
        if not n_pool.all():  # no prompt episodes (prompt_length 0): the prompt index is unused
            pg = g
        elif self.config.prompt_episode == "best":
            pg = self._heldout[self._heldout_offset[task]]
        else:
            pick = (rng.random(len(task)) * n_pool).astype(np.int64)
            pg = self._heldout[self._heldout_offset[task] + pick]
        k_star, p_len = self.config.prompt_length, self._ep_len[pg]
        if self.config.prompt_position == "last":
            p_start = np.maximum(p_len - k_star, 0)
        else:
            p_start = (rng.random(len(task)) * np.maximum(p_len - k_star + 1, 1)).astype(np.int64)
        off = self._ep_offset[task]
        return SegmentIndex(task, g - off, row - self._ep_begin[g], pg - off, p_start)

    # ---------------------------------------------------------------- gather
    def _window(self, g: np.ndarray, start: np.ndarray, length: int):
        """Rows (B, L) of steps start.. of global episodes g, right-aligned; mask (B, L); timesteps (B, L)."""
        n = np.minimum(length, self._ep_len[g] - start)            # real steps per sample
        j = np.arange(length)
        t = start[:, None] + j[None, :] - (length - n)[:, None]    # step within the episode
        mask = j[None, :] >= (length - n)[:, None]
        t = np.where(mask, t, 0)
        return self._ep_begin[g][:, None] + t, mask, t

    def _fields(self, g, start, length):
        rows, mask, t = self._window(g, start, length)
        pad = ~mask
        states, actions = self._obs[rows], self._act[rows]
        rewards, rtg = self._rew[rows][..., None], self._rtg[rows][..., None]
        for arr in (states, actions, rewards, rtg):
            arr[pad] = 0.0
        return states, actions, rewards, rtg, t.astype(np.int64), mask

    def gather(self, index: SegmentIndex) -> Batch:
        off = self._ep_offset[index.task]
        seg = self._fields(index.episode + off, index.start, self.config.context)
        prm = self._fields(index.prompt_episode + off, index.prompt_start, self.config.prompt_length)
        return Batch(*seg, index.task.copy(), *prm)

    def sample(self, task: np.ndarray, rng: np.random.Generator) -> Batch:
        """A batch for tasks ``task`` (B,) int (mixed tasks allowed)."""
        return self.gather(self.draw(task, rng))

    def sample_task(self, task: int, batch_size: int, rng: np.random.Generator) -> Batch:
        return self.sample(np.full(batch_size, task, np.int64), rng)

    def prompt(self, task: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """Prompts for evaluation rollouts of tasks (B,); with best/last they are fixed per task."""
        rng = rng or np.random.default_rng(0)
        return self.sample(task, rng)

    def train_episodes(self, task: str) -> np.ndarray:
        d = self.dataset[task]
        return np.setdiff1d(np.arange(d.n_episodes), self.heldout[task])


def _episode_space(d, demo):
    """A task's data followed by its demonstrations: observations, actions, rewards, episode starts."""
    if demo is None:
        return d.observations, d.actions, d.rewards, d.episode_starts
    return (np.concatenate([d.observations, demo.observations]), np.concatenate([d.actions, demo.actions]),
            np.concatenate([d.rewards, demo.rewards]),
            np.concatenate([d.episode_starts, demo.episode_starts[1:] + d.n_transitions]))


class ReferenceSampler:
    """Slow, obviously correct per-sample version of :meth:`SegmentSampler.gather` (tests, benchmark).

    Builds every field step by step from the dataset's episodes with its own normalisation and
    return-to-go arithmetic; shares nothing with the vectorised code but the index.
    """

    def __init__(self, dataset: OfflineDataset, config: SamplingConfig = SamplingConfig()):
        self.dataset, self.config = dataset, config
        self.mean, self.std = normalisation(dataset, config.state_norm, config.hide_goal)

    def _one(self, task_id: int, episode: int, start: int, length: int):
        task = self.dataset.tasks[task_id]
        d = self.dataset[task]
        if episode < d.n_episodes:
            ep = d.episode(episode)
        else:  # a demonstration: episodes E.. of the task's episode space
            ep = self.dataset.demos[task].episode(episode - d.n_episodes)
        T = len(ep["rewards"])
        steps = list(range(start, min(start + length, T)))
        pad = length - len(steps)
        D, A = d.obs_dim, d.act_dim
        s = np.zeros((length, D), np.float32)
        a = np.zeros((length, A), np.float32)
        r = np.zeros((length, 1), np.float32)
        g = np.zeros((length, 1), np.float32)
        ts = np.zeros(length, np.int64)
        m = np.zeros(length, bool)
        scale = np.float32(self.config.reward_scale)
        for k, step in enumerate(steps):
            i = pad + k
            s[i] = ((ep["observations"][step] - self.mean[task_id]) / self.std[task_id]).astype(np.float32)
            if self.config.hide_goal:
                s[i, 36:39] = 0.0
            a[i] = ep["actions"][step]
            r[i, 0] = ep["rewards"][step] / scale
            g[i, 0] = np.float32(sum(float(x) for x in ep["rewards"][step:])) / scale
            ts[i] = step
            m[i] = True
        return s, a, r, g, ts, m

    def gather(self, index: SegmentIndex) -> Batch:
        seg = [self._one(int(t), int(e), int(s), self.config.context)
               for t, e, s in zip(index.task, index.episode, index.start)]
        prm = [self._one(int(t), int(e), int(s), self.config.prompt_length)
               for t, e, s in zip(index.task, index.prompt_episode, index.prompt_start)]
        stack = lambda items: [np.stack(col) for col in zip(*items)]  # noqa: E731
        return Batch(*stack(seg), np.asarray(index.task, np.int64).copy(), *stack(prm))
