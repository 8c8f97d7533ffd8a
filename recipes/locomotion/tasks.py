"""Task families, goals, task ids and the train/test split of the locomotion benchmark.

Three families, as Prompt-DT (Xu et al., 2022, code ``mxu34/prompt-dt``) defines them and as both
HarmoDT papers use them for their unseen-task tables (ICML Table 4 / journal Table IV):

``cheetah_dir``  2 tasks, goal = direction ∈ {+1, -1}. Task 0 is forward (+1), task 1 backward (-1):
                 Prompt-DT's ``config/cheetah_dir/config_cheetah_dir_task{0,1}.pkl`` and its
                 ``gen_env`` (``prompt_dt/prompt_utils.py``).
``cheetah_vel``  40 tasks, goal = target forward velocity. Prompt-DT's ``HalfCheetahVelEnv.sample_tasks``
                 draws them as ``np.linspace(0.075, 3, 40)`` (its commented-out alternative is
                 uniform on [0, 3]); the 40 config pickles it ships hold exactly these values
                 (checked value by value), so task k has velocity 0.075·(k + 1).
``ant_dir``      50 tasks, goal = direction angle in [0, 2π). Prompt-DT drew them with unseeded
                 ``np.random.uniform(0, 2π)`` (``tp_envs/ant_dir.py``) and kept the draws only in
                 its config pickles ``config/ant_dir/config_ant_dir_task{k}.pkl``; the 50 angles
                 below are the float64 values stored there (read from the pickle bytes, not
                 re-drawn).

``goals="prompt_dt"`` (the default) gives the published goals above. ``goals="sampled"`` draws a
fresh set from a seed with the papers' stated distributions (velocities uniform on [0, 3],
angles uniform on [0, 2π); Cheetah-dir has no randomness), for robustness checks; the same seed
always gives the same goals. The published *datasets* (Prompt-DT's per-task pickles) are not
reachable from here, so the data is generated locally (see ``recipes.locomotion.expert``).

Prompt-DT took these environments from MACAW (Mitchell et al., 2021, ``eric-mitchell/macaw``,
``src/tp_envs/``: same rewards, same ``linspace`` velocities) and MACAW's offline buffers.

Split (journal Table VIII, identical to Prompt-DT's ``config/<family>/<family>_<n>.json`` and
MACAW's ``config/cheetah_vel/40tasks_offline.json`` / ``config/ant_dir/50tasks_offline.json``):
Cheetah-dir trains and tests on both directions; Cheetah-vel tests on tasks [2, 7, 15, 23, 26]
and trains on the other 35; Ant-dir tests on [6, 17, 23, 30, 41] and trains on the other 45.

Task ids are ``<family>-<index>`` (``cheetah_vel-2``), Prompt-DT's naming; task sets are
``<family>-train``, ``<family>-test`` and ``<family>-all``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FAMILIES: tuple[str, ...] = ("cheetah_dir", "cheetah_vel", "ant_dir")
GOAL_SOURCES: tuple[str, ...] = ("prompt_dt", "sampled")
EPISODE_LENGTH = 200  # Prompt-DT's max_ep_len for all three families

N_TASKS = {"cheetah_dir": 2, "cheetah_vel": 40, "ant_dir": 50}
TEST_TASKS: dict[str, tuple[int, ...]] = {
    "cheetah_dir": (0, 1),
    "cheetah_vel": (2, 7, 15, 23, 26),
    "ant_dir": (6, 17, 23, 30, 41),
}
TRAIN_TASKS: dict[str, tuple[int, ...]] = {
    "cheetah_dir": (0, 1),
    "cheetah_vel": tuple(i for i in range(40) if i not in TEST_TASKS["cheetah_vel"]),
    "ant_dir": tuple(i for i in range(50) if i not in TEST_TASKS["ant_dir"]),
}

# Prompt-DT's Ant-dir goal angles (radians), task 0..49, from its config pickles.
PROMPT_DT_ANT_DIR: tuple[float, ...] = (
    1.2033605945679715, 0.42663053293975295, 4.944775479235424, 4.123865140631488, 4.005661927041337,
    3.6166196447991155, 0.2454395410534735, 2.2482091824000023, 5.941902704664186, 0.3772718531319245,
    5.428936649786095, 5.512178944021152, 0.32165928764709933, 4.099267058824251, 3.4667560926228758,
    3.754286493596681, 3.0380999478653634, 1.7780670544024204, 1.87066585880318, 3.5280645037970855,
    2.488439431116824, 4.9555527108165744, 2.629414941289294, 0.9041750006610754, 0.9481747251390378,
    0.3470916400248258, 4.511560745487209, 1.8366841068540096, 1.2489330732603883, 5.223613581580657,
    3.5687934580622827, 0.5173559024487111, 3.42432703215533, 0.9987672483128179, 4.252223478300645,
    0.7443831939965014, 2.795992744398332, 5.579358183330077, 5.009380886994954, 0.42712294662677097,
    6.036807514750099, 4.141909635790574, 4.516203325267859, 4.672030605450681, 5.577812002817041,
    0.8416054504725834, 4.881875268913003, 5.26525595696687, 5.210675507763471, 0.1831988121347493,
)


class UnknownLocomotionTaskError(ValueError):
    """A family, task id, task set or goal source this module does not know."""


@dataclass(frozen=True)
class Task:
    """One task: its family, index within the family and goal (direction ±1, velocity, or angle)."""

    family: str
    index: int
    goal: float

    @property
    def name(self) -> str:
        return f"{self.family}-{self.index}"


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UnknownLocomotionTaskError(f"unknown locomotion family {family!r}; known: {', '.join(FAMILIES)}")
    return family


def goals(family: str, source: str = "prompt_dt", seed: int = 0) -> np.ndarray:
    """All goals of a family, indexed by task (float64). ``source``: ``prompt_dt`` | ``sampled``."""
    _check_family(family)
    if source not in GOAL_SOURCES:
        raise UnknownLocomotionTaskError(f"unknown goal source {source!r}; known: {', '.join(GOAL_SOURCES)}")
    if family == "cheetah_dir":
        return np.array([1.0, -1.0])
    if source == "prompt_dt":
        if family == "cheetah_vel":
            return np.linspace(0.075, 3.0, 40)
        return np.array(PROMPT_DT_ANT_DIR)
    # A generator of its own per family, so each family's goals depend on the seed alone.
    rng = np.random.default_rng([int(seed), FAMILIES.index(family)])
    if family == "cheetah_vel":
        return rng.uniform(0.0, 3.0, size=N_TASKS[family])
    return rng.uniform(0.0, 2.0 * math.pi, size=N_TASKS[family])


def parse_task(name: str) -> tuple[str, int]:
    """``'cheetah_vel-2'`` → ``('cheetah_vel', 2)``; unknown families or out-of-range indices raise."""
    family, sep, idx = str(name).rpartition("-")
    if not sep or family not in FAMILIES or not idx.isdigit():
        raise UnknownLocomotionTaskError(
            f"unknown locomotion task {name!r}: expected <family>-<index>, family one of {', '.join(FAMILIES)}")
    index = int(idx)
    if index >= N_TASKS[family]:
        raise UnknownLocomotionTaskError(f"task {name!r}: {family} has tasks 0..{N_TASKS[family] - 1}")
    return family, index


def task(name: str, source: str = "prompt_dt", seed: int = 0) -> Task:
    family, index = parse_task(name)
    return Task(family, index, float(goals(family, source, seed)[index]))


def taskset(name: str) -> list[str]:
    """``<family>-train | <family>-test | <family>-all`` → ordered task ids."""
    family, sep, part = str(name).rpartition("-")
    if not sep or family not in FAMILIES or part not in ("train", "test", "all"):
        known = ", ".join(f"{f}-{p}" for f in FAMILIES for p in ("train", "test", "all"))
        raise UnknownLocomotionTaskError(f"unknown locomotion task set {name!r}; known: {known}")
    indices = {"train": TRAIN_TASKS[family], "test": TEST_TASKS[family], "all": range(N_TASKS[family])}[part]
    return [f"{family}-{i}" for i in indices]


def resolve_tasks(taskset_name: str | None = None, tasks=None, family: str | None = None) -> list[str]:
    """Explicit ``tasks`` win over ``taskset_name``; with ``family`` given, every task must belong to it."""
    if tasks:
        out = [f"{f}-{i}" for f, i in (parse_task(str(t)) for t in tasks)]
        if len(set(out)) != len(out):
            raise UnknownLocomotionTaskError(f"duplicate tasks in {list(tasks)}")
    elif taskset_name is None:
        raise UnknownLocomotionTaskError("give a task set name or a list of tasks")
    else:
        out = taskset(str(taskset_name))
    if family is not None:
        _check_family(family)
        foreign = [t for t in out if parse_task(t)[0] != family]
        if foreign:
            raise UnknownLocomotionTaskError(f"tasks {foreign} are not in family {family}")
    return out
