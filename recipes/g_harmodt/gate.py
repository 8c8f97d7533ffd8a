"""The gating network of G-HarmoDT (journal Sec. IV-C3): which group (or task) an episode belongs to,
read from a few of its transitions.

Input: ``gn`` consecutive transitions concatenated, ``(s_1 ‖ a_1 ‖ r_1 ‖ … ‖ s_gn ‖ a_gn ‖ r_gn)``,
each part normalised with statistics pooled over every task (no per-task statistic may leak the
task): ``(s − μ_s)/σ_s``, ``(a − μ_a)/σ_a``, ``(r − μ_r)/σ_r``. Output: logits over the labels
(group ids for G-HarmoDT, task ids for the "+gating" baselines). Network: 3 linear layers, ReLU,
128 hidden units, trained with cross-entropy on the offline data.

Training windows come from the data episodes of each task except ``heldout_episodes`` per task
(chosen at random with the run's seed), which only measure accuracy: held-out accuracy is over
whole unseen episodes, not over unseen transitions of seen episodes. A window starts at step
``0 … max_start`` of its episode (``window=probe``: ``max_start = probe_steps − gn``, exactly the
positions the evaluation reads after its probe; ``window=any``: anywhere in the episode).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from recipes.metaworld.storage import OfflineDataset

WINDOWS = ("probe", "any")


@dataclass(frozen=True)
class GateSpec:
    """The ``gate.*`` keys (conf/method/*.yaml of the g_harmodt recipe), read once and checked before
    (``recipes.g_harmodt.train.check_gate_config``)."""

    target: str              # group | task | none
    schedule: str            # after | simultaneous
    probe_params: str
    blind: str
    window: str
    transitions: int         # gn
    probe_steps: int
    steps: int
    batch_size: int
    hidden: int
    heldout_episodes: int
    lr: float
    voting_thresh: float

    @classmethod
    def from_config(cls, gate) -> "GateSpec":
        from omegaconf import OmegaConf

        g = OmegaConf.to_container(gate, resolve=True)
        return cls(**{k: g[k] for k in cls.__dataclass_fields__})


class GateNet(nn.Module):
    """MLP ``in_dim → hidden → hidden → n_out`` (3 linear layers, ReLU between them)."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, n_out) logits


@dataclass
class TransitionStats:
    """Pooled normalisation of (s, a, r); shapes (S,), (A,), scalar."""

    s_mean: np.ndarray
    s_std: np.ndarray
    a_mean: np.ndarray
    a_std: np.ndarray
    r_mean: float
    r_std: float

    def features(self, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Raw ``states`` (B, gn, S), ``actions`` (B, gn, A), ``rewards`` (B, gn) -> (B, gn·(S+A+1)) float32."""
        s = (states - self.s_mean) / self.s_std
        a = (actions - self.a_mean) / self.a_std
        r = ((rewards - self.r_mean) / self.r_std)[..., None]
        x = np.concatenate([s, a, r], axis=-1)  # (B, gn, S+A+1): s_1 a_1 r_1 | s_2 a_2 r_2 …
        return x.reshape(x.shape[0], -1).astype(np.float32)


def check_gate_data(dataset: OfflineDataset, gn: int, heldout_episodes: int) -> None:
    """Raise ValueError unless every task can hold out ``heldout_episodes`` episodes, still train on
    one, and every episode has at least ``gn`` steps."""
    for t in dataset.tasks:
        d = dataset[t]
        if not 1 <= heldout_episodes < d.n_episodes:
            raise ValueError(f"gate.heldout_episodes={heldout_episodes}: task {t} has {d.n_episodes} episodes; "
                             f"expected 1 <= heldout_episodes < {d.n_episodes}")
        if d.episode_lengths().min() < gn:
            raise ValueError(f"task {t}: an episode of {d.episode_lengths().min()} steps is shorter than "
                             f"gate.transitions={gn}")


class GateData:
    """Every task's data episodes as flat arrays (only the steps a window can reach), split by
    episode into training and held-out; normalisation statistics over every transition.

    Args:
        dataset: the offline data (its data episodes; prompt demonstrations are not used).
        labels: label of each task (``dataset.tasks`` order): its group, or its own index.
        gn: transitions per window.
        max_start: last allowed window start within an episode (``None``: anywhere).
        heldout_episodes: data episodes per task kept for accuracy only (>= 1; fewer than the task has).
        seed: which episodes are held out.
    """

    def __init__(self, dataset: OfflineDataset, labels: Sequence[int], gn: int, max_start: int | None,
                 heldout_episodes: int, seed: int):
        tasks = list(dataset.tasks)
        if len(labels) != len(tasks):
            raise ValueError(f"{len(labels)} labels for {len(tasks)} tasks")
        check_gate_data(dataset, gn, heldout_episodes)
        self.gn, self.labels = int(gn), np.asarray(labels, np.int64)
        self.n_classes = int(self.labels.max()) + 1
        obs, act, rew, begin, last, ep_task, held = [], [], [], [], [], [], []
        moments = {"s": [0.0, 0.0], "a": [0.0, 0.0], "r": [0.0, 0.0]}  # Σx, Σx² over every transition
        rng = np.random.default_rng([int(seed), 11])
        rows = 0
        for i, t in enumerate(tasks):
            d = dataset[t]
            for key, x in (("s", d.observations), ("a", d.actions), ("r", d.rewards)):
                x = x.astype(np.float64)
                moments[key][0] += x.sum(0)
                moments[key][1] += np.square(x).sum(0)
            # last window start per episode: max_start, cut so that the window stays inside the episode;
            # only the steps a window can reach are kept (with window=probe, the first probe_steps)
            lens = d.episode_lengths()
            last_i = lens - self.gn if max_start is None else np.minimum(lens - self.gn, int(max_start))
            keep = last_i + self.gn
            idx = np.concatenate([np.arange(b, b + k) for b, k in zip(d.episode_starts[:-1], keep)])
            obs.append(d.observations[idx])
            act.append(d.actions[idx])
            rew.append(d.rewards[idx])
            begin.append(np.concatenate([[0], np.cumsum(keep)[:-1]]) + rows)
            last.append(last_i)
            ep_task.append(np.full(d.n_episodes, i))
            h = np.zeros(d.n_episodes, bool)
            h[rng.choice(d.n_episodes, heldout_episodes, replace=False)] = True
            held.append(h)
            rows += len(idx)
        self._obs, self._act = np.concatenate(obs), np.concatenate(act)  # (rows, S), (rows, A) raw
        self._rew = np.concatenate(rew)  # (rows,)
        self._begin, self._last = np.concatenate(begin), np.concatenate(last)  # (E,)
        self._task, self._held = np.concatenate(ep_task), np.concatenate(held)  # (E,)
        n = sum(dataset[t].n_transitions for t in tasks)
        mean = {k: v[0] / n for k, v in moments.items()}
        std = {k: np.sqrt(np.maximum(v[1] / n - np.square(mean[k]), 0.0)) + 1e-6 for k, v in moments.items()}
        self.stats = TransitionStats(mean["s"], std["s"], mean["a"], std["a"], float(mean["r"]), float(std["r"]))
        # training episodes per task, for a task-balanced draw
        self._train_eps = [np.flatnonzero((self._task == i) & ~self._held) for i in range(len(tasks))]
        self.tasks = tasks

    @property
    def in_dim(self) -> int:
        return self.gn * (self._obs.shape[1] + self._act.shape[1] + 1)

    def heldout(self) -> dict[str, list[int]]:
        """Task name -> indices (within the task) of its held-out episodes."""
        out = {}
        for i, t in enumerate(self.tasks):
            eps = np.flatnonzero(self._task == i)
            out[t] = (np.flatnonzero(self._held[eps])).tolist()
        return out

    def _windows(self, episodes: np.ndarray, starts: np.ndarray) -> np.ndarray:
        rows = self._begin[episodes][:, None] + starts[:, None] + np.arange(self.gn)[None]  # (B, gn)
        return self.stats.features(self._obs[rows], self._act[rows], self._rew[rows])

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A training batch: a task uniformly, one of its training episodes uniformly, a start uniformly
        in ``0 … last``. Returns features (B, in_dim) float32 and labels (B,) int64."""
        n_tasks = len(self._train_eps)
        task = (rng.random(batch) * n_tasks).astype(np.int64)
        counts = np.array([len(e) for e in self._train_eps])
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat = np.concatenate(self._train_eps)
        ep = flat[offsets[task] + (rng.random(batch) * counts[task]).astype(np.int64)]
        start = (rng.random(batch) * (self._last[ep] + 1)).astype(np.int64)
        return self._windows(ep, start), self.labels[task]

    def heldout_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Every window (every allowed start) of every held-out episode: features, labels."""
        eps = np.flatnonzero(self._held)
        n = self._last[eps] + 1
        ep = np.repeat(eps, n)
        start = np.concatenate([np.arange(k) for k in n])
        return self._windows(ep, start), self.labels[self._task[ep]]


class Gate:
    """The gating network with its optimizer and sampling RNG (all in ``state_dict``).

    ``step()`` takes one cross-entropy step on a fresh batch; ``predict`` returns labels.
    """

    def __init__(self, data: GateData, *, hidden: int = 128, lr: float = 1e-3, batch_size: int = 256, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.data, self.batch_size, self.device = data, int(batch_size), torch.device(device)
        with torch.random.fork_rng(devices=[]):  # torch's default init, seeded, global RNG untouched
            torch.manual_seed(int(seed) * 1_000_003 + 12)
            self.net = GateNet(data.in_dim, data.n_classes, hidden).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.rng = np.random.default_rng([int(seed), 13])
        self.steps = 0

    def step(self) -> float:
        x, y = self.data.sample(self.batch_size, self.rng)
        self.net.train()
        loss = nn.functional.cross_entropy(self.net(torch.from_numpy(x).to(self.device)),
                                           torch.from_numpy(y).to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return loss.item()

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Features (B, in_dim) -> predicted labels (B,) int64."""
        self.net.eval()
        if len(features) == 0:
            return np.zeros(0, np.int64)
        return self.net(torch.from_numpy(np.asarray(features, np.float32)).to(self.device)).argmax(-1).cpu().numpy()

    def heldout_accuracy(self) -> dict:
        """Accuracy on every window of the held-out episodes: overall and per label."""
        x, y = self.data.heldout_set()
        pred = self.predict(x)
        return accuracy_report(pred, y, self.data.n_classes)

    def state_dict(self) -> dict:
        """A copy (later steps do not change it): net, optimizer, sampling RNG, step count."""
        return copy.deepcopy({"net": self.net.state_dict(), "opt": self.opt.state_dict(),
                              "rng": self.rng.bit_generator.state, "steps": self.steps})

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.steps = int(state["steps"])


def accuracy_report(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict:
    """``{"overall", "per_label": {label: accuracy or None}, "n"}`` of predictions against targets."""
    pred, target = np.asarray(pred), np.asarray(target)
    per = {}
    for c in range(n_classes):
        sel = target == c
        per[str(c)] = float((pred[sel] == c).mean()) if sel.any() else None
    return {"overall": float((pred == target).mean()) if len(target) else None, "per_label": per, "n": int(len(target))}
