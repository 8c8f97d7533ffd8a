"""Recipe ``make_data`` and :func:`ensure_dataset`, the one call other recipes need for their data.

    python tools/run.py recipe=make_data data=mt10_near     # generate, validate, print figures
    python tools/run.py recipe=make_data data=mt10_sub data.workers=4
    python tools/run.py recipe=make_data debug=smoke       # two tasks, four short episodes each
    python tools/run.py recipe=make_data data=mt10_near format=minari minari_root=DIR
        # also written as Minari datasets metaworld/<task>/<composition>-v<minari_version>
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig

from maskmtl.config import ConfigError
from maskmtl.outputs import write_json
from recipes.metaworld.generate import GenerationSpec, generate_dataset, generate_demos
from recipes.metaworld.storage import OfflineDataset, demo_dir, is_complete, load_dataset, task_paths
from recipes.metaworld.tasksets import UnknownTaskError, resolve_tasks

REPO_ROOT = Path(__file__).resolve().parents[2]


def installed() -> bool:
    """maskmtl runs from an installed wheel (its config copy ``recipes/conf/`` exists), not a checkout."""
    return (REPO_ROOT / "recipes" / "conf" / "config.yaml").is_file()


def data_root(root: str | Path) -> Path:
    """``data_root`` from the config. A relative path is taken under the checkout maskmtl runs
    from (not the CWD, so every run of a checkout shares one data cache wherever it starts); from
    an installed wheel, which has no checkout, under the current directory (never site-packages)."""
    root = Path(root).expanduser()
    if root.is_absolute():
        return root
    return (Path.cwd() if installed() else REPO_ROOT) / root


def _refuse_locomotion(data: Mapping[str, Any] | None) -> None:
    if data and data.get("benchmark") == "locomotion":
        raise ConfigError(f"data.benchmark=locomotion (data.family={data.get('family')}): locomotion data "
                          "can be generated (recipe=make_data), but this recipe cannot train or evaluate "
                          "on it yet; choose a Meta-World data option")


def _require_data(data: Mapping[str, Any] | None) -> Mapping[str, Any]:
    _refuse_locomotion(data)
    if not data or "composition" not in data:
        raise ConfigError("no Meta-World data chosen: add data=<option> (conf/data: tiny, mt10_near, mt10_sub, ...)")
    return data


def dataset_tasks(data: Mapping[str, Any]) -> list[str]:
    _refuse_locomotion(data)
    try:
        return resolve_tasks(data.get("taskset"), data.get("tasks"))
    except UnknownTaskError as e:
        raise ConfigError(f"data.taskset / data.tasks: {e}") from e


def dataset_dir(data: Mapping[str, Any], root: str | Path) -> Path:
    """Where the dataset described by the ``data`` node lives: ``<root>/metaworld/<spec dirname>``."""
    try:
        spec = GenerationSpec.from_config(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    return data_root(root) / "metaworld" / spec.dirname()


def unseen_tasks(data: Mapping[str, Any]) -> list[str]:
    """Tasks with no training data that are only evaluated (``data.unseen_taskset``, e.g. ML45-test,
    or an explicit ``data.unseen_tasks`` list); [] when neither is set."""
    _refuse_locomotion(data)
    name, tasks = data.get("unseen_taskset"), data.get("unseen_tasks")
    if not name and not tasks:
        return []
    try:
        unseen = resolve_tasks(name, tasks)
    except UnknownTaskError as e:
        raise ConfigError(f"data.unseen_taskset / data.unseen_tasks: {e}") from e
    overlap = sorted(set(unseen) & set(dataset_tasks(data)))
    if overlap:
        raise ConfigError(f"data.unseen_tasks: {overlap} are training tasks too; unseen tasks must have no training data")
    if int(data.get("prompt_demos", 0) or 0) < 1:
        raise ConfigError(f"data.unseen_tasks {unseen} are seen only through prompt demonstrations: "
                          f"data.prompt_demos must be >= 1 (got {data.get('prompt_demos')})")
    return unseen


def writable(directory: Path, root: str | Path) -> None:
    """Make ``directory`` (under ``data_root``) and check that files can be written there."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"data_root={root}: cannot write the dataset folder {directory} ({e.strerror or e}); "
                          f"choose a writable data_root") from e


def ensure_demos(data: Mapping[str, Any], root: str | Path, tasks: Sequence[str]) -> OfflineDataset:
    """Only the prompt demonstrations (``data.prompt_demos`` expert episodes per task) of ``tasks``,
    generated if missing, stored beside the dataset's own demonstrations, loaded and validated. This is
    all a prompt-conditioned policy gets of an unseen task: its prompt, state statistics and
    return-to-go target come from these few episodes."""
    demos = int(data["prompt_demos"])  # >= 1, checked by unseen_tasks
    directory = dataset_dir(data, root)
    folder = demo_dir(directory, demos)
    spec = GenerationSpec.from_config(data)
    missing = [t for t in tasks if not is_complete(folder, t)]
    if missing:
        writable(folder, root)
    for t in missing:
        print(f"generating {demos} prompt demonstrations of unseen task {t}")
        generate_demos(t, spec, directory, demos)
    return load_dataset(folder, tasks)


def smoke_data_overrides(data: Mapping[str, Any], n_tasks: int = 2) -> dict[str, Any]:
    """``debug=smoke``'s data sizes as ``data.<key>: value``: the first ``n_tasks`` tasks, 4 episodes
    of 50 steps each (2 for sub_optimal), at most one demonstration and one held-out episode per
    task, the first unseen task only, generated in one process."""
    _refuse_locomotion(data)
    unseen = unseen_tasks(data)[:1]
    return {"data.tasks": dataset_tasks(data)[:n_tasks], "data.transitions_per_task": 200, "data.episode_length": 50,
            "data.workers": 1,
            "data.prompt_demos": 0 if data.get("source") == "minari" else min(int(data.get("prompt_demos", 0) or 0), 1),
            "data.unseen_taskset": None, "data.unseen_tasks": unseen or None, "data.sampling.heldout_episodes": 1}


def _locomotion(cfg: DictConfig) -> bool:
    data = cfg.get("data")
    return bool(data) and data.get("benchmark") == "locomotion"


def smoke_overrides(cfg: DictConfig) -> dict[str, Any]:
    if _locomotion(cfg):
        from recipes.locomotion import make_data as loco

        return loco.smoke_data_overrides(cfg.data)
    return smoke_data_overrides(_require_data(cfg.get("data")))


def check_config(cfg: DictConfig) -> None:
    """Before any data is made: the data node, its task lists and generation sizes."""
    if _locomotion(cfg):
        from recipes.locomotion import make_data as loco

        if cfg.get("format", "npz") != "npz":
            raise ConfigError(f"format={cfg.get('format')}: the locomotion data is written as npz only")
        loco.check_data_config(cfg.data)
        return
    data = _require_data(cfg.get("data"))
    if data.get("source", "generate") != "generate":
        raise ConfigError(f"data.source={data.get('source')!r}: recipe=make_data generates data; data.source=minari "
                          f"is for the training recipes (export Minari datasets with format=minari)")
    check_data_config(data)
    check_export_config(cfg)


FORMATS = ("npz", "minari")


def check_export_config(cfg: DictConfig) -> None:
    """``format`` (npz: the dataset folder only | minari: also Minari datasets), ``minari_version``."""
    fmt = cfg.get("format", "npz")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)} (conf/recipe/make_data.yaml)")
    v = cfg.get("minari_version", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"minari_version={v!r}: expected an integer >= 0 (the -v<N> of the Minari dataset ids)")
    if fmt == "minari":
        try:
            import minari  # noqa: F401
        except ImportError:
            raise ConfigError("format=minari needs the minari package: pip install -e '.[minari]'") from None
        from recipes.metaworld.minari_format import existing

        data = _require_data(cfg.get("data"))
        taken = existing(dataset_tasks(data), str(data["composition"]), cfg.get("minari_root"), v)
        if taken:
            did, path = next(iter(taken.items()))
            raise ConfigError(f"format=minari: Minari dataset {did} already exists at {path} ({len(taken)} of the "
                              f"ids are taken); nothing is overwritten: delete it, or choose another "
                              f"minari_version=N or minari_root=DIR")


def check_data_config(data: Mapping[str, Any]) -> None:
    """The ``data`` keys every Meta-World recipe reads, checked without generating anything."""
    if data.get("tasks") is not None and (isinstance(data["tasks"], str) or len(data["tasks"]) == 0):
        raise ConfigError(f"data.tasks={data['tasks']!r}: expected null (the task set data.taskset) or a "
                          f"non-empty list of task names")
    dataset_tasks(data)
    unseen_tasks(data)
    for key, lo in (("transitions_per_task", 1), ("episode_length", 1), ("seed", 0), ("workers", 1),
                    ("checkpoint_every", 1), ("prompt_demos", 0)):
        v = data.get(key, lo)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"data.{key}={v!r}: expected an integer >= {lo}")
    dataset_dir(data, ".")  # the remaining generation keys (GenerationSpec)
    check_source(data)


DATA_SOURCES = ("generate", "minari")


def check_source(data: Mapping[str, Any]) -> None:
    """``data.source``: ``generate`` (made here, cached under data_root) or ``minari`` (read from
    Minari datasets, e.g. ones ``recipe=make_data format=minari`` exported). A Minari source must
    name datasets that exist, and holds no separate prompt demonstrations and no unseen tasks."""
    source = data.get("source", "generate")
    if source not in DATA_SOURCES:
        raise ConfigError(f"data.source={source!r}: expected one of {', '.join(DATA_SOURCES)}")
    if source != "minari":
        return
    try:
        from recipes.metaworld import minari_format as mf

        mf._minari()
    except ImportError as e:
        raise ConfigError(f"data.source=minari: {e}") from None
    if int(data.get("prompt_demos", 0) or 0):
        raise ConfigError(f"data.source=minari: data.prompt_demos={data.get('prompt_demos')}, but Minari datasets "
                          f"hold no separate prompt demonstrations; set data.prompt_demos=0 (prompts and held-out "
                          f"episodes then come from each task's top-return episodes, data.sampling)")
    if unseen_tasks(data):
        raise ConfigError("data.source=minari: unseen tasks (data.unseen_taskset / data.unseen_tasks) need prompt "
                          "demonstrations, which Minari datasets do not hold; set both to null")
    ids = minari_ids(data)
    root = mf.root_dir(data.get("minari_root"))
    missing = [i for i in ids.values() if not (root / i).exists()]
    if missing:
        raise ConfigError(f"data.source=minari: no Minari dataset {', '.join(missing[:4])}"
                          f"{f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''} under {root} "
                          f"(data.minari_root, else MINARI_DATASETS_PATH, else ~/.minari/datasets); export them with "
                          f"`tools/run.py recipe=make_data data=<this data option> format=minari minari_root=DIR`, "
                          f"or name existing ones in data.minari_ids")


def minari_ids(data: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, str]:
    """Task -> Minari dataset id for ``data.source=minari``: ``data.minari_ids[task]`` when given,
    else ``metaworld/<task>/<data.composition>-v<data.minari_version>``."""
    from recipes.metaworld.minari_format import dataset_id

    given = dict(data.get("minari_ids") or {})
    version = data.get("minari_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"data.minari_version={version!r}: expected an integer >= 0")
    tasks = list(tasks) if tasks is not None else dataset_tasks(data)
    unknown = sorted(set(given) - set(tasks))
    if unknown:
        raise ConfigError(f"data.minari_ids: {unknown} are not tasks of this data option ({len(tasks)} tasks)")
    return {t: str(given.get(t) or dataset_id(t, str(data["composition"]), version)) for t in tasks}


def ensure_dataset(data: Mapping[str, Any], root: str | Path = "data", tasks: Sequence[str] | None = None,
                   progress: bool = True) -> OfflineDataset:
    """The dataset described by the ``data`` config node under ``root`` (the ``data_root`` key), for
    ``tasks`` (default: the node's task set). Tasks not yet on disk are generated (and cached for
    later runs); then every task is loaded and validated. With ``data.source=minari`` the tasks are
    read from their Minari datasets instead (nothing is generated)."""
    if _require_data(data).get("source", "generate") == "minari":
        from recipes.metaworld.minari_format import read_minari

        tasks = list(tasks) if tasks is not None else dataset_tasks(data)
        return read_minari(tasks, minari_root=data.get("minari_root"), ids=minari_ids(data, tasks))
    directory = dataset_dir(data, root)  # also checks the generation keys
    tasks = list(tasks) if tasks is not None else dataset_tasks(data)
    demos = int(data.get("prompt_demos", 0) or 0)
    done = [is_complete(directory, t) and (not demos or is_complete(demo_dir(directory, demos), t)) for t in tasks]
    if not all(done):
        writable(directory, root)
        generate_dataset(GenerationSpec.from_config(data), tasks, directory, workers=int(data.get("workers", 1)),
                         checkpoint_every=int(data.get("checkpoint_every", 10)), progress=progress, demos=demos)
    return load_dataset(directory, tasks, demos=demos)


def summarise(dataset: OfflineDataset, directory: Path) -> dict[str, Any]:
    """Transitions, episodes, success rate, mean return per task, and bytes on disk."""
    per_task, size = {}, 0
    for t in dataset.tasks:
        d = dataset[t]
        size += sum(p.stat().st_size for p in task_paths(directory, t))
        per_task[t] = {"transitions": d.n_transitions, "episodes": d.n_episodes,
                       "success_rate": float(d.success.mean()) if d.success is not None else float("nan"),
                       "return_mean": float(d.episode_returns().mean())}
    n = len(per_task)
    demos = None
    if dataset.demos is not None:
        k = dataset.demos[dataset.tasks[0]].n_episodes
        files = [p for t in dataset.tasks for p in task_paths(demo_dir(directory, k), t)]
        demos = {"per_task": k, "bytes_on_disk": sum(p.stat().st_size for p in files),
                 "success_rate": sum(float(dataset.demos[t].success.mean()) for t in dataset.tasks) / n}
    return {"directory": str(directory), "tasks": list(dataset.tasks), "bytes_on_disk": size, "demonstrations": demos,
            "transitions_per_task": sorted({v["transitions"] for v in per_task.values()}),
            "success_rate": sum(v["success_rate"] for v in per_task.values()) / n,
            "return_mean": sum(v["return_mean"] for v in per_task.values()) / n,
            "per_task": per_task}


def run(cfg: DictConfig) -> dict:
    from recipes.common import print_table, run_dir

    if _locomotion(cfg):
        from recipes.locomotion import make_data as loco

        summary = loco.run(cfg.data, cfg.data_root)
        write_json(run_dir() / "data_summary.json", summary)
        return summary
    t0 = time.perf_counter()
    data = _require_data(cfg.get("data"))
    directory = dataset_dir(data, cfg.data_root)
    tasks = dataset_tasks(data)
    already = [t for t in tasks if is_complete(directory, t)]
    print(f"{data['composition']} data for {len(tasks)} tasks in {directory} ({len(already)} already there)")
    dataset = ensure_dataset(data, cfg.data_root, tasks)
    summary = summarise(dataset, directory)
    summary.update({"composition": str(data["composition"]), "seconds": time.perf_counter() - t0,
                    "tasks_reused": already, "spec": GenerationSpec.from_config(data).key()})
    print_table(f"{data['composition']}: {directory.name}",
                {t: {k: float(v[k]) for k in ("success_rate", "return_mean", "episodes")}
                 for t, v in summary["per_task"].items()})
    print(f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk, {summary['seconds']:.0f} s, "
          f"mean success {summary['success_rate']:.3f}")
    if summary["demonstrations"]:
        demos = summary["demonstrations"]
        print(f"prompt demonstrations: {demos['per_task']} per task, success {demos['success_rate']:.3f}")
    if cfg.get("format", "npz") == "minari":
        from recipes.metaworld.minari_format import export_minari, root_dir

        print(f"writing Minari datasets under {root_dir(cfg.get('minari_root'))}")
        summary["minari"] = export_minari(dataset, str(data["composition"]), cfg.get("minari_root"),
                                          int(cfg.get("minari_version", 0)), source=str(directory))
        for did in summary["minari"]:
            print(f"  {did}")
    write_json(run_dir() / "data_summary.json", summary)
    return summary
