"""Meta-World offline datasets as Minari datasets (the standard offline-RL dataset format), both ways.

* :func:`export_minari` writes each task of an :class:`OfflineDataset` as one Minari dataset with id
  ``metaworld/<task>/<composition>-v<version>`` (e.g. ``metaworld/reach-v3/near_optimal-v0``), under
  a Minari root folder (the ``minari_root`` argument, else ``MINARI_DATASETS_PATH``, else Minari's
  own ``~/.minari/datasets``). An existing dataset is never replaced.
* :func:`read_minari` loads such datasets (ours, or any Minari dataset with Box(39) observations and
  Box(4) actions) back into an :class:`OfflineDataset`.

Layout differences. Minari stores ``T + 1`` observations per episode (s_0 .. s_T) and ``T + 1``
infos; maskmtl stores the ``T`` observations each action was taken in. Generation keeps no s_T, so
the export repeats s_{T-1} as the final observation and records that in the dataset metadata
(``maskmtl_final_observation: "repeat"``); the reader drops the final observation, which makes the
round trip exact. Meta-World episodes end only by the time limit: ``terminations`` are all False and
``truncations`` True at the last step. maskmtl keeps one success flag per episode ("ever succeeded");
``infos["success"]`` repeats it at every step (Minari wants per-step infos), and the reader takes
"any step succeeded" -- for foreign datasets with true per-step success that is the same definition.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from recipes.metaworld.storage import (METAWORLD_ACT_DIM, METAWORLD_OBS_DIM, DatasetError, OfflineDataset, TaskData,
                                       read_sidecar, task_paths)
from recipes.metaworld.tasksets import canonical_task

NAMESPACE = "metaworld"
ROOT_ENV = "MINARI_DATASETS_PATH"
FINAL_OBSERVATION = "repeat"  # how the export fills s_T, which generation does not keep


def _minari():
    try:
        import minari
    except ImportError as e:
        raise ImportError("Minari export/reading needs the minari package: pip install -e '.[minari]' "
                          "(minari with its hdf5 backend)") from e
    return minari


def dataset_id(task: str, composition: str, version: int = 0) -> str:
    """``metaworld/<task>/<composition>-v<version>``; ``task`` as its Meta-World 3.x name."""
    return f"{NAMESPACE}/{canonical_task(task)}/{composition}-v{int(version)}"


def root_dir(minari_root: str | Path | None = None) -> Path:
    """The Minari root: ``minari_root``, else ``MINARI_DATASETS_PATH``, else Minari's default."""
    if minari_root is not None and str(minari_root).strip():
        return Path(minari_root).expanduser().resolve()
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser().resolve()
    return Path.home() / ".minari" / "datasets"


@contextlib.contextmanager
def _root(minari_root: str | Path | None) -> Iterator[Path]:
    """Minari finds its root only through ``MINARI_DATASETS_PATH``: set it for the block, then restore it."""
    root = root_dir(minari_root)
    old = os.environ.get(ROOT_ENV)
    os.environ[ROOT_ENV] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop(ROOT_ENV, None)
        else:
            os.environ[ROOT_ENV] = old


def _eval_env_spec(task: str, provenance: Mapping):
    """The environment the data came from and recipes evaluate in (``recipes.metaworld.generate.make_env``)."""
    from gymnasium.envs.registration import EnvSpec

    spec = provenance.get("spec") or {}
    return EnvSpec(id=f"maskmtl/{task.removesuffix('-v3')}-v3", entry_point="recipes.metaworld.generate:make_env",
                   kwargs={"task": task, "seed": int(spec.get("seed", 0))},
                   max_episode_steps=int(spec["episode_length"]) if "episode_length" in spec else None,
                   disable_env_checker=True)


def _buffers(data: TaskData) -> list:
    from minari.data_collector import EpisodeBuffer

    out = []
    success = data.success
    for e in range(data.n_episodes):
        ep = data.episode(e)
        T = len(ep["rewards"])
        obs = np.concatenate([ep["observations"], ep["observations"][-1:]])  # s_T not kept: repeat s_{T-1}
        trunc = np.zeros(T, bool)
        trunc[-1] = True
        infos = {} if success is None else {"success": np.full(T + 1, bool(success[e]))}
        out.append(EpisodeBuffer(id=e, observations=obs, actions=ep["actions"].copy(),
                                 rewards=ep["rewards"].astype(np.float64), terminations=np.zeros(T, bool),
                                 truncations=trunc, infos=infos))
    return out


def existing(tasks: Sequence[str], composition: str, minari_root: str | Path | None = None,
             version: int = 0) -> dict[str, Path]:
    """``{id: folder}`` of the ids :func:`export_minari` would write that already exist."""
    root = root_dir(minari_root)
    ids = [dataset_id(t, composition, version) for t in tasks]
    return {i: root / i for i in ids if (root / i).exists()}


def export_minari(dataset: OfflineDataset, composition: str, minari_root: str | Path | None = None,
                  version: int = 0, source: str | None = None) -> dict[str, str]:
    """Write every task of ``dataset`` as Minari dataset :func:`dataset_id`; returns ``{id: folder}``.

    The task's provenance (generator spec, seeds, library versions) and, with ``source`` the maskmtl
    dataset folder, the stored archive's sha256 go into the metadata (``maskmtl_provenance``,
    ``description``). Raises :class:`DatasetError` naming the id and folder, before writing anything,
    when one exists. Minari writes in place, so a dataset whose writing fails is removed again.
    """
    minari = _minari()
    import gymnasium as gym

    ids = {t: dataset_id(t, composition, version) for t in dataset.tasks}
    with _root(minari_root) as root:
        taken = existing(dataset.tasks, composition, root, version)
        if taken:
            i, p = next(iter(taken.items()))
            raise DatasetError(f"Minari dataset {i} already exists at {p}; nothing was overwritten. Delete it, "
                               f"or export with another version (minari_version=N) or minari_root")
        written = {}
        for task, did in ids.items():
            d = dataset[task]
            d.validate(f"task {task}")
            obs_space = gym.spaces.Box(-np.inf, np.inf, (d.obs_dim,), np.float32)
            act_space = gym.spaces.Box(-1.0, 1.0, (d.act_dim,), np.float32)
            prov = dict(d.provenance)
            if source is not None and task_paths(source, task)[1].is_file():  # the stored archive's size, hash
                side = read_sidecar(source, task)
                prov["stored_as"] = {"dataset_dir": str(source), "format": side.get("format"),
                                     "npz_sha256": side.get("npz_sha256"), "npz_bytes": side.get("npz_bytes")}
            summary = {k: prov[k] for k in ("generator", "spec", "versions", "python", "source", "stored_as")
                       if k in prov}
            description = (f"maskmtl Meta-World offline data: task {task}, composition {composition}, "
                           f"{d.n_episodes} episodes / {d.n_transitions} transitions. Provenance: "
                           f"{json.dumps(summary, sort_keys=True)}")
            try:
                with warnings.catch_warnings():  # no email, no collecting env: said in the description
                    warnings.filterwarnings(
                        "ignore", message=".*(author_email|eval_env. is set to None|env_spec is None).*")
                    minari.create_dataset_from_buffers(
                        dataset_id=did, buffer=_buffers(d), env=None,
                        eval_env=_eval_env_spec(task, prov) if "spec" in prov else None,
                        observation_space=obs_space, action_space=act_space,
                        algorithm_name=str(prov.get("generator", "maskmtl")),
                        code_permalink="recipes/metaworld/generate.py", author="maskmtl",
                        description=description, data_format="hdf5")
                ds = minari.load_dataset(did)
                ds.storage.update_metadata({"maskmtl_provenance": json.dumps(prov, sort_keys=True),
                                            "maskmtl_source": str(source or ""),
                                            "maskmtl_final_observation": FINAL_OBSERVATION,
                                            "maskmtl_task": task, "maskmtl_composition": composition})
            except BaseException as e:
                # Minari writes its files in place: a half-written dataset would block the id, so the
                # folder (absent before, checked above) goes again
                shutil.rmtree(root / did, ignore_errors=True)
                if isinstance(e, (ValueError, OSError)):
                    raise DatasetError(f"Minari dataset {did} at {root / did}: cannot write it ({e})") from e
                raise
            written[did] = str(root / did)
    return written


def _check_space(space, dim: int | None, what: str, did: str, path: Path) -> None:
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1 or (dim is not None and space.shape[0] != dim):
        raise DatasetError(f"Minari dataset {did} at {path}: {what} space is {space}, expected a Box of shape "
                           f"({dim},) (Meta-World: observations 39, actions 4)")


def read_minari_task(did: str, task: str | None = None, minari_root: str | Path | None = None,
                     episodes: int | None = None, obs_dim: int | None = METAWORLD_OBS_DIM,
                     act_dim: int | None = METAWORLD_ACT_DIM) -> TaskData:
    """One Minari dataset as :class:`TaskData` (named ``task``, default the id's middle part)."""
    minari = _minari()
    with _root(minari_root) as root:
        path = root / did
        if not (path / "data").is_dir():
            raise DatasetError(f"Minari dataset {did} not found: no {path / 'data'} (minari_root / "
                               f"{ROOT_ENV} is {root})")
        try:
            ds = minari.load_dataset(did)
        except (ValueError, OSError, KeyError) as e:
            raise DatasetError(f"Minari dataset {did} at {path}: cannot load ({e})") from e
        _check_space(ds.observation_space, obs_dim, "observation", did, path)
        _check_space(ds.action_space, act_dim, "action", did, path)
        meta = ds.storage.metadata
        n = ds.total_episodes if episodes is None else int(episodes)
        if n > ds.total_episodes or n < 1:
            raise DatasetError(f"Minari dataset {did} at {path}: {ds.total_episodes} episodes, {n} asked for")
        eps, flags = [], []
        for ep in ds.iterate_episodes(list(range(n))):
            T = len(ep.rewards)
            obs = np.asarray(ep.observations)
            if obs.shape[0] != T + 1:
                raise DatasetError(f"Minari dataset {did} at {path}: episode {ep.id} has {obs.shape[0]} observations "
                                   f"for {T} steps, expected {T + 1}")
            eps.append({"observations": obs[:T].astype(np.float32), "actions": np.asarray(ep.actions, np.float32),
                        "rewards": np.asarray(ep.rewards, np.float32)})
            s = (ep.infos or {}).get("success")
            flags.append(None if s is None else bool(np.any(np.asarray(s))))
    parts = did.split("/")
    name = task or meta.get("maskmtl_task") or (parts[-2] if len(parts) >= 3 else None)
    if name is None:
        raise DatasetError(f"Minari dataset {did} at {path}: which Meta-World task it holds is unknown; give task=")
    name = canonical_task(name)
    prov = json.loads(meta["maskmtl_provenance"]) if meta.get("maskmtl_provenance") else {}
    prov = {**prov, "minari_id": did, "minari_path": str(path)}
    data = TaskData.from_episodes(name, eps, flags if all(f is not None for f in flags) else None, prov)
    data.validate(f"Minari dataset {did} at {path}", obs_dim, act_dim)
    return data


def read_minari(tasks: Sequence[str], composition: str | None = None, minari_root: str | Path | None = None,
                ids: Mapping[str, str] | None = None, version: int = 0, episodes: int | None = None,
                obs_dim: int | None = METAWORLD_OBS_DIM, act_dim: int | None = METAWORLD_ACT_DIM) -> OfflineDataset:
    """``tasks`` from Minari: dataset ``ids[task]`` when given, else :func:`dataset_id` (task, composition, version)."""
    tasks = [canonical_task(t) for t in tasks]
    ids = dict(ids or {})
    if composition is None and any(t not in ids for t in tasks):
        raise ValueError("read_minari: give composition= (ids metaworld/<task>/<composition>-v<version>) "
                         "or an id for every task in ids=")
    data = {t: read_minari_task(ids.get(t) or dataset_id(t, composition, version), t, minari_root, episodes,
                                obs_dim, act_dim) for t in tasks}
    try:
        return OfflineDataset(tasks, data)
    except DatasetError as e:
        raise DatasetError(f"Minari root {root_dir(minari_root)}: {e}") from e
