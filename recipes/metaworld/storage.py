"""On-disk format of maskmtl's offline datasets, and the in-memory objects every reader returns.

A dataset is a directory with two files per task (``<task>`` is the Meta-World name, e.g.
``reach-v3``)::

    <task>.npz    numpy archive (zip, deflate-compressed):
        observations    float32 (N, obs_dim)   s_t, every transition of every episode, in order
        actions         float32 (N, act_dim)   a_t taken in s_t
        rewards         float32 (N,)           r_t received after a_t
        episode_starts  int64   (E + 1,)       episode e is rows [episode_starts[e], episode_starts[e+1]);
                                               starts[0] = 0, starts[E] = N, strictly increasing
        success         bool    (E,)           optional: the episode ever had info["success"] = 1
    <task>.json   sidecar, written after the archive (its presence marks the task complete):
        format, task, n_transitions, n_episodes, obs_dim, act_dim,
        npz_bytes, npz_sha256        size and hash of the archive (truncation / corruption check)
        stats                        state_mean, state_std (per dim), return mean and quantiles,
                                     success_rate, per-episode return and success
        provenance                   who made it: generator config, library versions, seed, ...
    demos-<n>/    optional: n prompt demonstrations per task, kept apart from the training data,
                  in the same format (``load_dataset(..., demos=n)`` attaches them as ``.demos``)

Loading checks both files and raises :class:`DatasetError` naming the offending file for: a
missing task, a truncated or corrupt archive, missing keys, wrong dtypes or shapes, NaN/inf
values, bad episode boundaries, and observation/action sizes that disagree with the expected
environment or between tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from maskmtl.masks import atomic_write_bytes
from maskmtl.outputs import write_json

FORMAT = "maskmtl-offline-v1"
ARRAY_KEYS = ("observations", "actions", "rewards", "episode_starts")
RETURN_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Meta-World 3.x: 39-d observation, 4-d action.
METAWORLD_OBS_DIM, METAWORLD_ACT_DIM = 39, 4


class DatasetError(Exception):
    """A dataset file is missing, truncated, corrupt or inconsistent; the message names the file."""


@dataclass
class TaskData:
    """All transitions of one task, episodes stored back to back.

    Shapes: ``observations`` (N, obs_dim) float32, ``actions`` (N, act_dim) float32, ``rewards``
    (N,) float32, ``episode_starts`` (E + 1,) int64 offsets, ``success`` (E,) bool or ``None`` when
    the source does not record it.
    """

    task: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_starts: np.ndarray
    success: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_episodes(cls, task: str, episodes: Sequence[Mapping[str, np.ndarray]],
                      success: Sequence[bool] | None = None, provenance: dict | None = None) -> "TaskData":
        """Concatenate per-episode dicts with ``observations`` (T, D), ``actions`` (T, A), ``rewards`` (T,) or (T, 1)."""
        if not episodes:
            raise DatasetError(f"task {task}: no episodes")
        lengths = [len(ep["rewards"]) for ep in episodes]
        return cls(
            task=task,
            observations=np.concatenate([np.asarray(ep["observations"], np.float32) for ep in episodes]),
            actions=np.concatenate([np.asarray(ep["actions"], np.float32) for ep in episodes]),
            rewards=np.concatenate([np.asarray(ep["rewards"], np.float32).reshape(-1) for ep in episodes]),
            episode_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            success=None if success is None else np.asarray(success, dtype=bool),
            provenance=dict(provenance or {}),
        )

    @property
    def n_transitions(self) -> int:
        return int(self.episode_starts[-1])

    @property
    def n_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    def episode_returns(self) -> np.ndarray:
        """(E,) float64 undiscounted return of each episode."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts[:-1])

    def episode(self, e: int) -> dict[str, np.ndarray]:
        a, b = self.episode_starts[e], self.episode_starts[e + 1]
        return {"observations": self.observations[a:b], "actions": self.actions[a:b], "rewards": self.rewards[a:b]}

    def head(self, n_episodes: int) -> "TaskData":
        """The first ``n_episodes`` episodes (sub-optimal data is a prefix of near-optimal data)."""
        if not 0 < n_episodes <= self.n_episodes:
            raise DatasetError(f"task {self.task}: asked for the first {n_episodes} of {self.n_episodes} episodes")
        end = self.episode_starts[n_episodes]
        return TaskData(self.task, self.observations[:end], self.actions[:end], self.rewards[:end],
                        self.episode_starts[:n_episodes + 1].copy(),
                        None if self.success is None else self.success[:n_episodes], dict(self.provenance))

    def stats(self) -> dict[str, Any]:
        """State mean/std (per dimension, over all transitions), return quantiles, success rate."""
        returns = self.episode_returns()
        obs = self.observations.astype(np.float64)
        return {
            "state_mean": obs.mean(0).tolist(),
            "state_std": obs.std(0).tolist(),
            "return_mean": float(returns.mean()),
            "return_quantiles": {f"q{int(q * 100)}": float(np.quantile(returns, q)) for q in RETURN_QUANTILES},
            "success_rate": None if self.success is None else float(self.success.mean()),
            "episode_returns": returns.tolist(),
            "episode_success": None if self.success is None else self.success.astype(int).tolist(),
            "episode_lengths": self.episode_lengths().tolist(),
        }

    def validate(self, source: str, obs_dim: int | None = None, act_dim: int | None = None) -> None:
        """Raise :class:`DatasetError` naming ``source`` unless shapes, dtypes, values and episode bounds are sound."""
        def bad(msg: str):
            raise DatasetError(f"{source}: {msg}")

        for name, arr, ndim, dtype in (("observations", self.observations, 2, np.float32),
                                       ("actions", self.actions, 2, np.float32),
                                       ("rewards", self.rewards, 1, np.float32),
                                       ("episode_starts", self.episode_starts, 1, np.int64)):
            if not isinstance(arr, np.ndarray) or arr.ndim != ndim:
                bad(f"{name} must be a {ndim}-d array, got shape {getattr(arr, 'shape', None)}")
            if arr.dtype != dtype:
                bad(f"{name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        n = len(self.observations)
        if len(self.actions) != n or len(self.rewards) != n:
            bad(f"observations/actions/rewards have {n}/{len(self.actions)}/{len(self.rewards)} rows; they must agree")
        starts = self.episode_starts
        if len(starts) < 2 or starts[0] != 0 or starts[-1] != n or np.any(np.diff(starts) <= 0):
            bad(f"episode_starts must rise strictly from 0 to the number of transitions ({n}); "
                f"got {len(starts)} offsets from {starts[:1].tolist()} to {starts[-1:].tolist()}")
        if self.success is not None and (self.success.dtype != bool or self.success.shape != (len(starts) - 1,)):
            bad(f"success must be bool of shape ({len(starts) - 1},), got {self.success.dtype} {self.success.shape}")
        for name in ("observations", "actions", "rewards"):
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                bad(f"{name} holds {int((~np.isfinite(arr)).sum())} NaN/inf values")
        if obs_dim is not None and self.obs_dim != obs_dim:
            bad(f"observations have {self.obs_dim} dimensions, the environment has {obs_dim}")
        if act_dim is not None and self.act_dim != act_dim:
            bad(f"actions have {self.act_dim} dimensions, the environment has {act_dim}")


@dataclass
class OfflineDataset:
    """Several tasks' :class:`TaskData` in a fixed task order (the order defines task ids).

    ``demos``: optional prompt demonstrations of the same tasks, kept apart from the training data.
    """

    tasks: list[str]
    data: dict[str, TaskData]
    demos: "OfflineDataset | None" = None

    def __post_init__(self):
        missing = [t for t in self.tasks if t not in self.data]
        if missing:
            raise DatasetError(f"dataset lacks tasks {missing}")
        dims = {(self.data[t].obs_dim, self.data[t].act_dim) for t in self.tasks}
        if len(dims) > 1:
            per = {t: (self.data[t].obs_dim, self.data[t].act_dim) for t in self.tasks}
            raise DatasetError(f"tasks disagree on (obs_dim, act_dim): {per}")
        if self.demos is not None and (self.demos.tasks != self.tasks or self.demos.obs_dim != self.obs_dim
                                       or self.demos.act_dim != self.act_dim):
            raise DatasetError(f"demonstrations cover {self.demos.tasks} with dims "
                               f"({self.demos.obs_dim}, {self.demos.act_dim}); the data {self.tasks} "
                               f"({self.obs_dim}, {self.act_dim})")

    def __getitem__(self, task: str) -> TaskData:
        return self.data[task]

    @property
    def obs_dim(self) -> int:
        return self.data[self.tasks[0]].obs_dim

    @property
    def act_dim(self) -> int:
        return self.data[self.tasks[0]].act_dim

    def head(self, n_episodes: int) -> "OfflineDataset":
        return OfflineDataset(list(self.tasks), {t: self.data[t].head(n_episodes) for t in self.tasks}, self.demos)


# ---------------------------------------------------------------------------------------- files

def task_paths(directory: str | Path, task: str) -> tuple[Path, Path]:
    """``(<dir>/<task>.npz, <dir>/<task>.json)``."""
    d = Path(directory)
    return d / f"{task}.npz", d / f"{task}.json"


def demo_dir(directory: str | Path, n_demos: int) -> Path:
    """Folder (same format) of the ``n_demos`` prompt demonstrations per task that go with a dataset."""
    return Path(directory) / f"demos-{n_demos}"


def is_complete(directory: str | Path, task: str) -> bool:
    """True once the sidecar exists (it is written after the archive)."""
    npz, sidecar = task_paths(directory, task)
    return npz.exists() and sidecar.exists()


def save_task(directory: str | Path, data: TaskData) -> Path:
    """Write ``<task>.npz`` then ``<task>.json``, each atomically; refuses to overwrite a complete task."""
    npz, sidecar = task_paths(directory, data.task)
    if sidecar.exists():
        raise DatasetError(f"{sidecar} exists: task {data.task} is already stored; nothing was overwritten")
    data.validate(str(npz))
    arrays = {"observations": data.observations, "actions": data.actions, "rewards": data.rewards,
              "episode_starts": data.episode_starts}
    if data.success is not None:
        arrays["success"] = data.success
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    payload = buf.getvalue()
    atomic_write_bytes(npz, payload)
    write_json(sidecar, {
        "format": FORMAT, "task": data.task, "n_transitions": data.n_transitions, "n_episodes": data.n_episodes,
        "obs_dim": data.obs_dim, "act_dim": data.act_dim,
        "npz_bytes": len(payload), "npz_sha256": hashlib.sha256(payload).hexdigest(),
        "stats": data.stats(), "provenance": data.provenance,
    })
    return npz


def load_task(directory: str | Path, task: str, obs_dim: int | None = METAWORLD_OBS_DIM,
              act_dim: int | None = METAWORLD_ACT_DIM, check_hash: bool = True) -> TaskData:
    """Load and validate one task; every failure is a :class:`DatasetError` naming the file."""
    npz, sidecar = task_paths(directory, task)
    if not npz.exists() or not sidecar.exists():
        missing = [str(p) for p in (npz, sidecar) if not p.exists()]
        raise DatasetError(f"task {task} is missing from {directory}: no {' and no '.join(missing)}")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{sidecar}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("task") != task:
        raise DatasetError(f"{sidecar}: format {meta.get('format')!r} task {meta.get('task')!r}, "
                           f"expected {FORMAT!r} task {task!r}")
    payload = npz.read_bytes()
    if len(payload) != meta.get("npz_bytes"):
        raise DatasetError(f"{npz}: {len(payload)} bytes, the sidecar recorded {meta.get('npz_bytes')} "
                           f"(truncated or replaced file)")
    if check_hash and hashlib.sha256(payload).hexdigest() != meta.get("npz_sha256"):
        raise DatasetError(f"{npz}: content hash differs from the one in {sidecar.name} (corrupt file)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{npz}: unreadable archive ({e})") from e
    lacking = [k for k in ARRAY_KEYS if k not in arrays]
    if lacking:
        raise DatasetError(f"{npz}: missing arrays {lacking}")
    data = TaskData(task, arrays["observations"], arrays["actions"], arrays["rewards"], arrays["episode_starts"],
                    arrays.get("success"), meta.get("provenance", {}))
    data.validate(str(npz), obs_dim, act_dim)
    if data.n_transitions != meta.get("n_transitions") or data.n_episodes != meta.get("n_episodes"):
        raise DatasetError(f"{npz}: {data.n_transitions} transitions / {data.n_episodes} episodes, the sidecar "
                           f"says {meta.get('n_transitions')} / {meta.get('n_episodes')}")
    return data


def load_dataset(directory: str | Path, tasks: Iterable[str], obs_dim: int | None = METAWORLD_OBS_DIM,
                 act_dim: int | None = METAWORLD_ACT_DIM, demos: int = 0) -> OfflineDataset:
    """Load and validate every task of ``tasks`` from ``directory`` (see the module docstring), and with
    ``demos > 0`` the prompt demonstrations stored in ``demo_dir(directory, demos)``."""
    tasks = list(tasks)
    data = {t: load_task(directory, t, obs_dim, act_dim) for t in tasks}
    demo_set = load_dataset(demo_dir(directory, demos), tasks, obs_dim, act_dim) if demos else None
    if demo_set is not None:
        for t in tasks:
            if demo_set[t].n_episodes != demos:
                raise DatasetError(f"{task_paths(demo_dir(directory, demos), t)[0]}: {demo_set[t].n_episodes} "
                                   f"demonstrations, expected {demos}")
    try:
        return OfflineDataset(tasks, data, demo_set)
    except DatasetError as e:
        raise DatasetError(f"{directory}: {e}") from e


def save_dataset(directory: str | Path, dataset: OfflineDataset) -> None:
    for t in dataset.tasks:
        save_task(directory, dataset[t])
    if dataset.demos is not None:
        n = {dataset.demos[t].n_episodes for t in dataset.tasks}
        if len(n) != 1:
            raise DatasetError(f"demonstrations per task differ ({sorted(n)}); store them separately")
        save_dataset(demo_dir(directory, n.pop()), dataset.demos)


def read_sidecar(directory: str | Path, task: str) -> dict:
    return json.loads(task_paths(directory, task)[1].read_text())
