"""What a training recipe needs from the benchmark its data comes from, chosen by ``data.benchmark``.

The harmodt recipe trains and evaluates on two kinds of offline data, both stored in the same
format (``recipes/metaworld/storage.py``):

``metaworld`` (no ``data.benchmark`` key): Meta-World tasks (``recipes/metaworld``), scored by
    success (``info["success"]`` ever true in an episode of at most 500 steps).
``locomotion`` (``data.benchmark: locomotion``): Cheetah-dir, Cheetah-vel and Ant-dir
    (``recipes/locomotion``), scored by return (the cumulative reward of a ``data.episode_length``
    -step episode; the tasks have no success signal).

:func:`benchmark_of` picks the implementation; everything benchmark-specific a recipe reads goes
through it: the data keys' checks, the training and unseen tasks, the ``debug=smoke`` sizes, the
dataset and the unseen tasks' demonstrations (generated when missing), the evaluation
environments and the metric the results lead with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

from maskmtl.config import ConfigError
from recipes.metaworld.storage import OfflineDataset


class Benchmark(ABC):
    """The interface (see the module docstring). ``headline``: the per-task metric results lead
    with and the best-so-far compares (``success`` | ``return``); ``per_task_keys``: the metrics of
    an evaluation kept per task in ``results.json``; ``smoke_eval``: ``debug=smoke``'s evaluation
    sizes."""

    name: str
    headline: str
    per_task_keys: tuple[str, ...]
    smoke_eval: Mapping[str, Any]

    @abstractmethod
    def check(self, cfg) -> None:
        """The ``data`` keys, and the ``eval`` keys whose valid values depend on the benchmark."""

    @abstractmethod
    def train_tasks(self, data: Mapping[str, Any]) -> list[str]:
        """The training tasks, in the order of the dataset's rows."""

    @abstractmethod
    def unseen_tasks(self, data: Mapping[str, Any]) -> list[str]:
        """Tasks with no training data, evaluated through their prompt demonstrations ([] if none)."""

    @abstractmethod
    def smoke_data(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``debug=smoke``'s data sizes as ``data.<key>: value``."""

    @abstractmethod
    def dataset(self, data: Mapping[str, Any], root: str) -> OfflineDataset:
        """The training tasks' data (and their demonstrations, ``.demos``), generated when missing."""

    @abstractmethod
    def unseen_demos(self, data: Mapping[str, Any], root: str, tasks: Sequence[str]) -> OfflineDataset:
        """The prompt demonstrations of the unseen ``tasks``, generated when missing."""

    @abstractmethod
    def make_envs(self, data: Mapping[str, Any], tasks: Sequence[str], ev) -> list[list]:
        """``ev.parallel`` evaluation environments of each task (``run_grid``'s interface)."""


class MetaWorld(Benchmark):
    name = "metaworld"
    headline = "success"
    per_task_keys = ("success", "return")
    smoke_eval = {"eval.episodes": 1, "eval.parallel": 1, "eval.max_steps": 40}

    def check(self, cfg) -> None:
        from recipes.metaworld.make_data import check_data_config

        check_data_config(cfg.data)
        steps = cfg.eval.max_steps
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 500:
            raise ConfigError(f"eval.max_steps={steps}: expected an integer in 1..500 (Meta-World episodes end at 500)")

    def train_tasks(self, data):
        from recipes.metaworld.make_data import dataset_tasks

        return dataset_tasks(data)

    def unseen_tasks(self, data):
        from recipes.metaworld.make_data import unseen_tasks

        return unseen_tasks(data)

    def smoke_data(self, data):
        from recipes.metaworld.make_data import smoke_data_overrides

        return smoke_data_overrides(data)

    def dataset(self, data, root):
        from recipes.metaworld.make_data import ensure_dataset

        return ensure_dataset(data, root)

    def unseen_demos(self, data, root, tasks):
        from recipes.metaworld.make_data import ensure_demos

        return ensure_demos(data, root, tasks)

    def make_envs(self, data, tasks, ev):
        """Meta-World environments, goals from ``ev.seed``."""
        from recipes.metaworld.generate import make_env

        return [[make_env(t, ev.seed) for _ in range(ev.parallel)] for t in tasks]


class Locomotion(Benchmark):
    name = "locomotion"
    headline = "return"
    per_task_keys = ("return",)
    # the episode length follows data.episode_length (conf/data/<family>.yaml: data.eval_steps)
    smoke_eval = {"eval.episodes": 1, "eval.parallel": 1}

    def check(self, cfg) -> None:
        from recipes.locomotion.make_data import check_data_config

        split = check_data_config(cfg.data)
        steps = cfg.eval.max_steps
        if steps != split.episode_length:
            raise ConfigError(f"eval.max_steps={steps}: locomotion episodes are data.episode_length="
                              f"{split.episode_length} steps, in the data and in the evaluation; set eval.max_steps="
                              f"{split.episode_length} (or leave it to follow data.episode_length)")
        if cfg.data.get("sampling") is not None and cfg.data.sampling.get("hide_goal"):
            raise ConfigError("data.sampling.hide_goal=true: hides Meta-World's goal position (obs[36:39]); the "
                              "locomotion observations have no goal to hide, set it to false")

    def train_tasks(self, data):
        from recipes.locomotion.config import split_from_config

        return [t.name for t in split_from_config(data).train]

    def unseen_tasks(self, data):
        from recipes.locomotion.config import split_from_config

        return [t.name for t in split_from_config(data).unseen]

    def smoke_data(self, data):
        from recipes.locomotion.make_data import smoke_data_overrides

        return smoke_data_overrides(data)

    def dataset(self, data, root):
        from recipes.locomotion.make_data import ensure_dataset

        return ensure_dataset(data, root)[0]

    def unseen_demos(self, data, root, tasks):
        from recipes.locomotion.make_data import ensure_dataset

        demos = ensure_dataset(data, root, progress=False)[1]  # generated with the dataset; loaded here
        if demos is None or list(demos.tasks) != list(tasks):
            raise ConfigError(f"data.unseen_tasks {list(tasks)}: no prompt demonstrations (data.prompt_demos >= 1)")
        return demos

    def make_envs(self, data, tasks, ev):
        """Locomotion environments of ``data.episode_length`` steps; each episode's reset noise comes
        from its seed (``run_grid``: eval seed, task row, episode)."""
        from recipes.locomotion.envs import EvalEnv
        from recipes.locomotion.tasks import task as make_task

        source, seed = data.get("goals", "prompt_dt"), int(data.get("seed", 0))
        return [[EvalEnv(make_task(t, source, seed), ev.max_steps) for _ in range(ev.parallel)] for t in tasks]


BENCHMARKS: dict[str, Benchmark] = {"metaworld": MetaWorld(), "locomotion": Locomotion()}


def benchmark_of(data: Mapping[str, Any] | None) -> Benchmark:
    """The benchmark of a ``data`` node: ``data.benchmark`` (absent or null: Meta-World)."""
    name = (data.get("benchmark") if data else None) or "metaworld"
    if name not in BENCHMARKS:
        raise ConfigError(f"data.benchmark={name!r}: expected one of {', '.join(BENCHMARKS)} (absent: metaworld)")
    return BENCHMARKS[name]
