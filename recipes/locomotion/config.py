"""Reading a locomotion ``data`` node (``conf/data/{cheetah_dir,cheetah_vel,ant_dir}.yaml``).

:func:`split_from_config` checks every key it reads and raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from maskmtl.config import ConfigError, is_int
from recipes.locomotion.tasks import (EPISODE_LENGTH, FAMILIES, GOAL_SOURCES, Task,
                                      UnknownLocomotionTaskError, resolve_tasks, task)

BENCHMARK = "locomotion"


def is_locomotion(data: Mapping[str, Any] | None) -> bool:
    return bool(data) and data.get("benchmark") == BENCHMARK


@dataclass(frozen=True)
class LocomotionSplit:
    """Training tasks, the tasks the papers report on (``test``) and the unseen ones among them."""

    family: str
    train: tuple[Task, ...]
    test: tuple[Task, ...]
    unseen: tuple[Task, ...]
    episode_length: int
    episodes_per_task: int = 1
    composition: str = "near_optimal"


def _tasks(data, set_key: str, list_key: str, family: str, source: str, seed: int) -> tuple[Task, ...]:
    name, tasks = data.get(set_key), data.get(list_key)
    if not name and not tasks:
        return ()
    try:
        return tuple(task(t, source, seed) for t in resolve_tasks(name, tasks, family=family))
    except UnknownLocomotionTaskError as e:
        raise ConfigError(f"data.{set_key} / data.{list_key}: {e}") from e


def split_from_config(data: Mapping[str, Any]) -> LocomotionSplit:
    if not is_locomotion(data):
        raise ConfigError(f"data.benchmark={data.get('benchmark') if data else None!r}: expected {BENCHMARK!r}")
    family = data.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"data.family={family!r}: expected one of {', '.join(FAMILIES)}")
    source = data.get("goals", "prompt_dt")
    if source not in GOAL_SOURCES:
        raise ConfigError(f"data.goals={source!r}: expected one of {', '.join(GOAL_SOURCES)}")
    seed = data.get("seed", 0)
    if not is_int(0)(seed):
        raise ConfigError(f"data.seed={seed!r}: expected an integer >= 0")
    length = data.get("episode_length", EPISODE_LENGTH)
    if not is_int(1)(length):
        raise ConfigError(f"data.episode_length={length!r}: expected an integer >= 1")
    episodes = data.get("episodes_per_task", 1)
    if not is_int(1)(episodes):
        raise ConfigError(f"data.episodes_per_task={episodes!r}: expected an integer >= 1")
    composition = data.get("composition", "near_optimal")
    if composition not in ("near_optimal", "sub_optimal"):
        raise ConfigError(f"data.composition={composition!r}: expected near_optimal or sub_optimal")
    train = _tasks(data, "taskset", "tasks", family, source, seed)
    if not train:
        raise ConfigError("data.taskset / data.tasks: no training tasks")
    test = _tasks(data, "test_taskset", "test_tasks", family, source, seed)
    unseen = _tasks(data, "unseen_taskset", "unseen_tasks", family, source, seed)
    overlap = sorted({t.name for t in unseen} & {t.name for t in train})
    if overlap:
        raise ConfigError(f"data.unseen_tasks: {overlap} are training tasks too; unseen tasks must have no training data")
    if unseen and int(data.get("prompt_demos", 0) or 0) < 1:
        raise ConfigError(f"data.unseen_tasks {[t.name for t in unseen]} are seen only through prompt "
                          f"demonstrations: data.prompt_demos must be >= 1 (got {data.get('prompt_demos')})")
    return LocomotionSplit(family, train, test or train, unseen, length, episodes, composition)
