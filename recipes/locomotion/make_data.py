"""Locomotion offline data in maskmtl's dataset format (``recipes/metaworld/storage.py``).

    python tools/run.py recipe=make_data data=cheetah_vel            # 35 tasks × 5 expert episodes + demos
    python tools/run.py recipe=make_data data=cheetah_vel data.composition=sub_optimal
    python tools/run.py recipe=make_data data=cheetah_vel debug=smoke

Layout: ``<data_root>/locomotion/<family>-<composition>-<E>ep-<L>steps-seed<S>-<hash>/`` with one
``<task>.npz`` + ``<task>.json`` per training task and ``demos-<n>/`` holding ``data.prompt_demos``
expert episodes for every training and unseen task (own seeds, stream 1, never training data).
The hash covers every generation setting (planner settings, goals, sizes, seed, generator
version), so different settings never share a folder. Generation is resumable per task: a task
whose sidecar exists is kept, a task interrupted mid-way is generated again from its seeds (the
episodes are deterministic, so the result is the same); there are no checkpoints inside a task.
Tasks run in ``data.workers`` processes.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from maskmtl.config import ConfigError, is_int
from recipes.common import kill_point
from recipes.locomotion.config import LocomotionSplit, split_from_config
from recipes.locomotion.envs import ACT_DIM, OBS_DIM
from recipes.locomotion.expert import (EXPERT, GENERATOR, GENERATOR_VERSION, WEAKEST, composition_configs,
                                       generate_task)
from recipes.locomotion.tasks import task as make_task
from recipes.metaworld.storage import OfflineDataset, demo_dir, is_complete, load_dataset, save_task


def _int(data: Mapping[str, Any], key: str, lo: int, default: int) -> int:
    v = data.get(key, default)
    if not is_int(lo)(v):
        raise ConfigError(f"data.{key}={v!r}: expected an integer >= {lo}")
    return v


def spec(data: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that determines the generated episodes (hashed into the folder name)."""
    split = split_from_config(data)
    return {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "family": split.family,
            "goals": data.get("goals", "prompt_dt"), "seed": int(data.get("seed", 0)),
            "composition": split.composition, "episodes_per_task": split.episodes_per_task,
            "episode_length": split.episode_length, "expert": asdict(EXPERT), "weakest": asdict(WEAKEST)}


def dataset_dir(data: Mapping[str, Any], root: str | Path) -> Path:
    from recipes.metaworld.make_data import data_root

    s = spec(data)
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    name = (f"{s['family']}-{s['composition']}-{s['episodes_per_task']}ep-{s['episode_length']}steps-"
            f"seed{s['seed']}-{digest}")
    return data_root(root) / "locomotion" / name


def check_data_config(data: Mapping[str, Any]) -> LocomotionSplit:
    split = split_from_config(data)
    _int(data, "workers", 1, 1)
    _int(data, "prompt_demos", 0, 0)
    return split


def _job(args) -> tuple[str, str, float]:
    kind, name, directory, composition, episodes, demos, seed, length, source = args
    t = make_task(name, source, seed)
    t0 = time.perf_counter()
    if kind == "data":
        configs, stream, out = composition_configs(composition, episodes), 0, Path(directory)
    else:
        configs, stream, out = [EXPERT] * demos, 1, demo_dir(directory, demos)
    # fault injection for the kill-and-resume test: MASKMTL_KILL_AT_STEP=<data|demos>:<task>:<episodes done>
    data = generate_task(t, configs, seed, stream=stream, max_steps=length,
                         progress=lambda t, i, ep: kill_point(f"{kind}:{t.name}:{i + 1}"))
    out.mkdir(parents=True, exist_ok=True)
    save_task(out, data)
    return kind, name, time.perf_counter() - t0


def ensure_dataset(data: Mapping[str, Any], root: str | Path = "data",
                   progress: bool = True) -> tuple[OfflineDataset, OfflineDataset | None]:
    """Generate whatever of the dataset is missing, then load and validate all of it: the training
    tasks' data (with their prompt demonstrations as ``.demos``) and the unseen tasks' demonstrations
    (``None`` without unseen tasks or demonstrations)."""
    split = check_data_config(data)
    directory = dataset_dir(data, root)
    demos = int(data.get("prompt_demos", 0) or 0)
    seed, source = int(data.get("seed", 0)), data.get("goals", "prompt_dt")
    train = [t.name for t in split.train]
    demo_tasks = train + [t.name for t in split.unseen]
    jobs = [("data", n) for n in train if not is_complete(directory, n)]
    if demos:
        jobs += [("demos", n) for n in demo_tasks if not is_complete(demo_dir(directory, demos), n)]
    if jobs:
        directory.mkdir(parents=True, exist_ok=True)
        args = [(k, n, str(directory), split.composition, split.episodes_per_task, demos, seed,
                 split.episode_length, source) for k, n in jobs]
        workers = min(int(data.get("workers", 1)), len(args))
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            results = pool.map(_job, args) if pool else map(_job, args)
            for i, (kind, name, secs) in enumerate(results, 1):
                if progress:
                    print(f"[{i}/{len(args)}] {kind} {name}: {secs:.1f} s", flush=True)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    dims = {"obs_dim": OBS_DIM[split.family], "act_dim": ACT_DIM[split.family]}
    dataset = load_dataset(directory, train, demos=demos, **dims)
    unseen = [t.name for t in split.unseen]
    unseen_demos = load_dataset(demo_dir(directory, demos), unseen, **dims) if demos and unseen else None
    return dataset, unseen_demos


def smoke_data_overrides(data: Mapping[str, Any]) -> dict[str, Any]:
    """``debug=smoke``: two training tasks and one unseen task (when the family has any), one
    10-step episode each, one prompt demonstration, one process."""
    split = split_from_config(data)
    out = {"data.tasks": [t.name for t in split.train[:2]], "data.episodes_per_task": 1,
           "data.episode_length": 10, "data.workers": 1, "data.prompt_demos": 1}
    if split.unseen:
        out.update({"data.unseen_taskset": None, "data.unseen_tasks": [split.unseen[0].name]})
    return out


def run(data: Mapping[str, Any], root: str | Path) -> dict[str, Any]:
    """The ``make_data`` recipe's work for a locomotion ``data`` node; returns the summary it prints."""
    from recipes.common import print_table

    t0 = time.perf_counter()
    directory = dataset_dir(data, root)
    train = [t.name for t in split_from_config(data).train]
    already = [t for t in train if is_complete(directory, t)]
    print(f"{data['composition']} locomotion data for {len(train)} tasks in {directory} ({len(already)} already there)")
    dataset, unseen_demos = ensure_dataset(data, root)
    per_task = {t: {"episodes": float(dataset[t].n_episodes), "return_mean": float(dataset[t].episode_returns().mean()),
                    "return_max": float(dataset[t].episode_returns().max())} for t in dataset.tasks}
    print_table(f"{data['composition']}: {directory.name}", per_task)
    summary = {"directory": str(directory), "tasks": train, "tasks_reused": already, "spec": spec(data),
               "seconds": time.perf_counter() - t0, "per_task": per_task,
               "return_mean": sum(v["return_mean"] for v in per_task.values()) / len(per_task)}
    demo_sets = [d for d in (dataset.demos, unseen_demos) if d is not None]
    if demo_sets:
        summary["demonstrations"] = {t: float(d[t].episode_returns().mean()) for d in demo_sets for t in d.tasks}
        print(f"prompt demonstrations: mean return {sum(summary['demonstrations'].values()) / len(summary['demonstrations']):.1f} "
              f"over {len(summary['demonstrations'])} tasks")
    print(f"{summary['seconds']:.0f} s, mean return {summary['return_mean']:.1f}")
    return summary
