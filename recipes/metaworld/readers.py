"""Readers for offline data made elsewhere; each returns the same :class:`OfflineDataset` as storage.

* :func:`read_episode_dirs` -- the MTDiff / HarmoDT layout: ``<root>/<task>/<i>.npz``, one episode
  per file (keys ``observations`` (T, D), ``actions`` (T, A), ``rewards`` (T,) or (T, 1), and
  ``terminals`` or ``dones``; optional ``success``). The published code reads the first 2000
  episodes per task as near-optimal data and the first 1000 as sub-optimal data.
* :func:`read_trajectory_pickles` -- Prompt-DT style: one pickle per task holding a list of
  trajectory dicts with the same keys. Unpickling runs arbitrary code, so it is refused unless
  ``allow_pickle=True``.

Task folders/files may use ``-v2`` (published data) or ``-v3`` names; datasets are keyed by the
Meta-World 3.x name. Only the first ``episodes`` episodes are kept; prompts are chosen later by the
sampler from held-out episodes (the published code's "prompt" episodes are ordinary training data).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from recipes.metaworld.storage import METAWORLD_ACT_DIM, METAWORLD_OBS_DIM, DatasetError, OfflineDataset, TaskData
from recipes.metaworld.tasksets import canonical_task

PUBLISHED_EPISODES = {"near_optimal": 2000, "sub_optimal": 1000}


class PickleNotAllowedError(DatasetError):
    """Reading a pickle was asked for without ``allow_pickle=True``."""


def _candidates(root: Path, task: str, suffix: str = "") -> list[Path]:
    base = task.removesuffix("-v3")
    return [root / f"{name}{suffix}" for name in (task, f"{base}-v2", base)]


def _find(root: Path, task: str, suffix: str = "") -> Path:
    for p in _candidates(root, task, suffix):
        if p.exists():
            return p
    tried = ", ".join(str(p) for p in _candidates(root, task, suffix))
    raise DatasetError(f"task {task}: none of {tried} exists")


def _episode_from_mapping(ep: Mapping[str, Any], source: str) -> tuple[dict[str, np.ndarray], bool | None]:
    """Check one episode's arrays; returns them as float32 plus its success flag when recorded."""
    missing = [k for k in ("observations", "actions", "rewards") if k not in ep]
    if missing:
        raise DatasetError(f"{source}: missing keys {missing} (has {sorted(ep)})")
    obs, act = np.asarray(ep["observations"]), np.asarray(ep["actions"])
    rew = np.asarray(ep["rewards"])
    if rew.ndim == 2 and rew.shape[1] == 1:
        rew = rew[:, 0]
    if obs.ndim != 2 or act.ndim != 2 or rew.ndim != 1 or not len(obs) == len(act) == len(rew) or len(rew) == 0:
        raise DatasetError(f"{source}: expected observations (T, D), actions (T, A), rewards (T,) with T > 0; got "
                           f"{obs.shape}, {act.shape}, {np.asarray(ep['rewards']).shape}")
    success = None
    for key in ("success", "successes"):
        if key in ep:
            success = bool(np.any(np.asarray(ep[key])))
    return {"observations": obs.astype(np.float32), "actions": act.astype(np.float32),
            "rewards": rew.astype(np.float32)}, success


def _task_data(task: str, episodes: list, flags: list, provenance: dict, source: str,
               obs_dim: int | None, act_dim: int | None) -> TaskData:
    success = flags if all(f is not None for f in flags) else None
    data = TaskData.from_episodes(task, episodes, success, provenance)
    data.validate(source, obs_dim, act_dim)
    return data


def read_episode_dirs(root: str | Path, tasks: Sequence[str], episodes: int | None = None,
                      composition: str | None = None, obs_dim: int | None = METAWORLD_OBS_DIM,
                      act_dim: int | None = METAWORLD_ACT_DIM) -> OfflineDataset:
    """Read ``<root>/<task>/0.npz … (n-1).npz`` for every task.

    ``n`` is ``episodes`` if given, else 2000 for ``composition='near_optimal'`` and 1000 for
    ``'sub_optimal'`` (the published split). A missing episode file is an error naming it.
    """
    if episodes is None:
        if composition not in PUBLISHED_EPISODES:
            raise ValueError(f"give episodes=N or composition in {sorted(PUBLISHED_EPISODES)}, got {composition!r}")
        episodes = PUBLISHED_EPISODES[composition]
    root = Path(root)
    tasks = [canonical_task(t) for t in tasks]
    data = {}
    for task in tasks:
        folder = _find(root, task)
        eps, flags = [], []
        for i in range(episodes):
            path = folder / f"{i}.npz"
            if not path.exists():
                raise DatasetError(f"{path} is missing: {folder} must hold episodes 0..{episodes - 1}")
            try:
                with np.load(path, allow_pickle=False) as f:
                    ep, flag = _episode_from_mapping({k: f[k] for k in f.files}, str(path))
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise DatasetError(f"{path}: unreadable archive ({e})") from e
            eps.append(ep)
            flags.append(flag)
        data[task] = _task_data(task, eps, flags, {"source": str(folder), "format": "episode-dirs",
                                                   "episodes": episodes}, str(folder), obs_dim, act_dim)
    try:
        return OfflineDataset(tasks, data)
    except DatasetError as e:
        raise DatasetError(f"{root}: {e}") from e


def read_trajectory_pickles(root: str | Path, tasks: Sequence[str], allow_pickle: bool = False,
                            pattern: str = "{task}.pkl", episodes: int | None = None,
                            obs_dim: int | None = METAWORLD_OBS_DIM,
                            act_dim: int | None = METAWORLD_ACT_DIM) -> OfflineDataset:
    """Read one pickle per task (``pattern`` formatted with the task name; ``-v2`` names are tried too),
    each a list of trajectory dicts. Keeps the first ``episodes`` trajectories when given.

    Raises :class:`PickleNotAllowedError` unless ``allow_pickle=True``: loading a pickle executes
    whatever code the file asks for, so only open files from a source you trust.
    """
    root = Path(root)
    tasks = [canonical_task(t) for t in tasks]
    data = {}
    for task in tasks:
        candidates = [root / pattern.format(task=name) for name in (task, task.replace("-v3", "-v2"),
                                                                    task.removesuffix("-v3"))]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DatasetError(f"task {task}: none of {', '.join(map(str, candidates))} exists")
        if not allow_pickle:
            raise PickleNotAllowedError(f"{path} is a pickle; unpickling runs arbitrary code from the file. "
                                        f"Pass allow_pickle=True only for files from a source you trust.")
        try:
            with open(path, "rb") as f:
                trajectories = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
            raise DatasetError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
        if not isinstance(trajectories, (list, tuple)) or not trajectories:
            raise DatasetError(f"{path}: expected a non-empty list of trajectory dicts, got {type(trajectories).__name__}")
        if episodes is not None:
            if len(trajectories) < episodes:
                raise DatasetError(f"{path}: {len(trajectories)} trajectories, {episodes} asked for")
            trajectories = trajectories[:episodes]
        eps, flags = [], []
        for i, traj in enumerate(trajectories):
            if not isinstance(traj, Mapping):
                raise DatasetError(f"{path}: trajectory {i} is a {type(traj).__name__}, expected a dict")
            ep, flag = _episode_from_mapping(traj, f"{path} trajectory {i}")
            eps.append(ep)
            flags.append(flag)
        data[task] = _task_data(task, eps, flags, {"source": str(path), "format": "trajectory-pickle"},
                                str(path), obs_dim, act_dim)
    try:
        return OfflineDataset(tasks, data)
    except DatasetError as e:
        raise DatasetError(f"{root}: {e}") from e
