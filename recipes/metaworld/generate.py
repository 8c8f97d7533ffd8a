"""Generate Meta-World offline data with the scripted experts and a replay-buffer-like curriculum.

The papers train on SAC replay buffers (random → expert over a training run). We imitate one per
task: episode i of a schedule of E episodes, at progress f = i / E, is played by

* ``random``  (f < random_fraction):  uniform random actions;
* ``learning`` (f < learn_end[difficulty]), with g = progress within the phase in [0, 1):
    the expert sees object/goal positions shifted by a per-episode N(0, (offset_std·(1-g))²) offset,
    its action gets N(0, (noise_min + noise_extra·(1-g))²) noise, and each step is replaced by a
    uniform random action with probability ε = eps_max·(1-g)^eps_power;
* ``expert``: the expert's action + N(0, expert_noise²).

Actions are clipped to [-1, 1]. ``near_optimal`` keeps all E episodes, ``sub_optimal`` the first
E/2 (the papers' "first 50 % of the buffer"); both are prefixes of one deterministic sequence.
Optionally, a few extra expert episodes per task (``demos``) are stored apart as prompt
demonstrations, so that prompts never come out of the training data.
Goals are random per episode (MT50-rand): every episode has its own seed drawn from
``(seed, task's index in the papers' order, episode index)``, so a task's data does not depend on
which task set, process or resumed run produced it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from maskmtl.masks import atomic_write_bytes
from maskmtl.outputs import write_json
from recipes.common import kill_point
from recipes.metaworld.storage import DatasetError, TaskData, demo_dir, is_complete, save_task
from recipes.metaworld.tasksets import DIFFICULTY, PAPER_ORDER, canonical_task

GENERATOR_VERSION = 1
COMPOSITIONS = ("near_optimal", "sub_optimal")
# Observation slots the expert reads object/goal positions from (Meta-World 3.x, 39-d): object 1
# xyz, object 2 xyz, goal xyz, and the previous frame's copies of the two object positions.
_OFFSET_SLOTS = ((4, 22), (11, 29), (36, None))


@dataclass(frozen=True)
class Curriculum:
    """The per-episode exploration levels (see the module docstring); defaults from measured runs."""

    random_fraction: float = 0.05
    learn_end: Mapping[str, float] = field(default_factory=lambda: {"easy": 0.3, "medium": 0.4, "hard": 0.5,
                                                                    "very_hard": 0.6})
    eps_max: float = 0.9
    eps_power: float = 1.5
    offset_std: float = 0.10
    noise_min: float = 0.1
    noise_extra: float = 0.5
    expert_noise: float = 0.1

    def levels(self, i: int, n_episodes: int, difficulty: str) -> dict[str, Any]:
        """Exploration levels of episode ``i`` of a schedule of ``n_episodes``."""
        f = i / n_episodes
        end = float(self.learn_end[difficulty])
        if f < self.random_fraction:
            return {"phase": "random", "eps": 1.0, "offset_std": 0.0, "noise_std": 0.0}
        if f < end:
            g = (f - self.random_fraction) / (end - self.random_fraction)
            return {"phase": "learning", "eps": self.eps_max * (1 - g) ** self.eps_power,
                    "offset_std": self.offset_std * (1 - g), "noise_std": self.noise_min + self.noise_extra * (1 - g)}
        return {"phase": "expert", "eps": 0.0, "offset_std": 0.0, "noise_std": self.expert_noise}


@dataclass(frozen=True)
class GenerationSpec:
    """What to generate per task. ``transitions_per_task`` sizes the full (near-optimal) schedule."""

    composition: str = "near_optimal"
    transitions_per_task: int = 50_000
    episode_length: int = 500
    seed: int = 0
    curriculum: Curriculum = field(default_factory=Curriculum)

    def __post_init__(self):
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"data.composition={self.composition!r}: expected one of {COMPOSITIONS}")
        if not 0 < self.episode_length <= 500:
            raise ValueError(f"data.episode_length={self.episode_length}: Meta-World episodes have 1..500 steps")
        if self.transitions_per_task % self.episode_length or self.transitions_per_task < 2 * self.episode_length:
            raise ValueError(f"data.transitions_per_task={self.transitions_per_task} must be a multiple of "
                             f"data.episode_length={self.episode_length} and cover at least 2 episodes")
        c = self.curriculum
        unknown = set(c.learn_end) ^ {"easy", "medium", "hard", "very_hard"}
        if unknown:
            raise ValueError(f"data.curriculum.learn_end must give easy, medium, hard, very_hard; differs in {unknown}")
        bad = {k: v for k, v in c.learn_end.items() if not c.random_fraction < v <= 1}
        if bad or not 0 <= c.random_fraction < 1:
            raise ValueError(f"data.curriculum: need 0 <= random_fraction ({c.random_fraction}) < learn_end <= 1; "
                             f"learn_end out of range: {bad}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "GenerationSpec":
        """From a ``data`` config node (keys as this class's fields; ``curriculum`` as Curriculum's)."""
        # floats throughout, so that `0` and `0.0` in a config give the same spec (and folder)
        cur = {k: float(v) for k, v in dict(cfg.get("curriculum") or {}).items() if k != "learn_end"}
        if (cfg.get("curriculum") or {}).get("learn_end") is not None:
            cur["learn_end"] = {k: float(v) for k, v in dict(cfg["curriculum"]["learn_end"]).items()}
        return cls(composition=str(cfg["composition"]), transitions_per_task=int(cfg["transitions_per_task"]),
                   episode_length=int(cfg.get("episode_length", 500)), seed=int(cfg.get("seed", 0)),
                   curriculum=Curriculum(**cur))

    @property
    def schedule_episodes(self) -> int:
        """E: episodes in the full schedule."""
        return self.transitions_per_task // self.episode_length

    @property
    def n_episodes(self) -> int:
        """Episodes stored per task: E (near-optimal) or the first E // 2 (sub-optimal)."""
        return self.schedule_episodes if self.composition == "near_optimal" else self.schedule_episodes // 2

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["curriculum"]["learn_end"] = dict(self.curriculum.learn_end)
        return {"generator_version": GENERATOR_VERSION, **d}

    def dirname(self) -> str:
        """A directory name unique to this spec: readable prefix + hash of every field."""
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.composition}-{self.transitions_per_task}t-{self.episode_length}steps-seed{self.seed}-{digest}"


# ------------------------------------------------------------------------------- environments

def make_env(task: str, seed: int):
    """A Meta-World 3.x env with the goal visible and a fresh random goal at every reset.

    This is what Meta-World's own task maker does before freezing the goal: construct the class,
    make it fully observable, unfreeze its random vector and seed it.
    """
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False
    env.__dict__.pop("sawyer_observation_space", None)  # cached bounds would clip the goal to 0
    env._freeze_rand_vec = False
    env._set_task_called = True
    env.seeded_rand_vec = True
    env.seed(int(seed))
    return env


def make_expert(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def episode_rng(seed: int, task: str, episode: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), PAPER_ORDER.index(task), int(episode)])


def run_episode(env, expert, rng: np.random.Generator, levels: Mapping[str, Any], length: int) -> dict[str, Any]:
    """Play one episode; returns observations (T, 39) / actions (T, 4) / rewards (T,) float32 and success."""
    env.seed(int(rng.integers(2**31 - 1)))  # draws this episode's goal and object positions
    obs, _ = env.reset()
    offsets = [rng.normal(0.0, levels["offset_std"], 3) for _ in _OFFSET_SLOTS]
    obs_buf = np.empty((length, obs.shape[0]), np.float32)
    act_buf = np.empty((length, 4), np.float32)
    rew_buf = np.empty(length, np.float32)
    success = False
    for t in range(length):
        if levels["phase"] == "random":
            action = rng.uniform(-1.0, 1.0, 4)
        else:
            seen = obs.copy()
            for (cur, prev), off in zip(_OFFSET_SLOTS, offsets):
                seen[cur:cur + 3] += off
                if prev is not None:
                    seen[prev:prev + 3] += off
            action = expert.get_action(seen) + rng.normal(0.0, levels["noise_std"], 4)
            if rng.random() < levels["eps"]:
                action = rng.uniform(-1.0, 1.0, 4)
        action = np.clip(action, -1.0, 1.0)
        obs_buf[t], act_buf[t] = obs, action
        obs, reward, _, _, info = env.step(action)
        rew_buf[t] = reward
        success |= bool(info["success"])
    return {"observations": obs_buf, "actions": act_buf, "rewards": rew_buf, "success": success}


# ------------------------------------------------------------------------------- one task

def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("metaworld", "mujoco", "gymnasium", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _partial_dir(directory: Path, task: str) -> Path:
    return directory / ".partial" / task


def _save_chunk(folder: Path, spec: GenerationSpec, first: int, episodes: list[dict]) -> None:
    """Checkpoint episodes ``first ..`` as one chunk file (atomic); the spec key guards reuse.

    Chunks hold only new episodes, so checkpointing costs O(episodes) in total."""
    buf = io.BytesIO()
    np.savez(buf, key=np.array(json.dumps(spec.key(), sort_keys=True)), first=np.int64(first),
             observations=np.concatenate([e["observations"] for e in episodes]),
             actions=np.concatenate([e["actions"] for e in episodes]),
             rewards=np.concatenate([e["rewards"] for e in episodes]),
             lengths=np.array([len(e["rewards"]) for e in episodes], np.int64),
             success=np.array([e["success"] for e in episodes], bool))
    atomic_write_bytes(folder / f"chunk_{first:07d}.npz", buf.getvalue())


def _load_partial(folder: Path, spec: GenerationSpec) -> list[dict]:
    """Episodes 0.. of an interrupted run of the same spec, read from consecutive chunks; reading
    stops at the first chunk that is unreadable, foreign or not contiguous (it will be redone)."""
    episodes: list[dict] = []
    key = json.dumps(spec.key(), sort_keys=True)
    for chunk in sorted(folder.glob("chunk_*.npz")) if folder.exists() else []:
        try:
            with np.load(chunk, allow_pickle=False) as f:
                if str(f["key"]) != key or int(f["first"]) != len(episodes):
                    break
                bounds = np.concatenate([[0], np.cumsum(f["lengths"])])
                obs, act, rew, suc = f["observations"], f["actions"], f["rewards"], f["success"]
        except (OSError, ValueError, KeyError, EOFError):
            break
        episodes += [{"observations": obs[a:b], "actions": act[a:b], "rewards": rew[a:b], "success": bool(x)}
                     for a, b, x in zip(bounds[:-1], bounds[1:], suc)]
    return episodes


def generate_task(task: str, spec: GenerationSpec, directory: str | Path, checkpoint_every: int = 10,
                  on_episode: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate (or finish) one task's file in ``directory``; returns a summary.

    Every ``checkpoint_every`` episodes the new episodes are saved as a chunk under
    ``.partial/<task>/``; an interrupted run resumes after the last chunk, so no episode is stored
    twice and at most ``checkpoint_every`` episodes are played again.
    """
    directory = Path(directory)
    task = canonical_task(task)
    if is_complete(directory, task):
        return {"task": task, "skipped": True}
    t0 = time.perf_counter()
    partial = _partial_dir(directory, task)
    episodes = _load_partial(partial, spec)[:spec.n_episodes]
    resumed_from = saved = len(episodes)
    difficulty = DIFFICULTY[task]
    schedule = [spec.curriculum.levels(i, spec.schedule_episodes, difficulty) for i in range(spec.n_episodes)]
    env, expert = make_env(task, spec.seed), make_expert(task)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")  # experts' own clipping note
        for i in range(len(episodes), spec.n_episodes):
            episodes.append(run_episode(env, expert, episode_rng(spec.seed, task, i), schedule[i], spec.episode_length))
            if on_episode is not None:
                on_episode(task)
            kill_point(f"data:{task}:{i + 1}")  # fault injection: MASKMTL_KILL_AT_STEP=data:<task>:<episodes>
            if checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < spec.n_episodes:
                _save_chunk(partial, spec, saved, episodes[saved:])
                saved = i + 1
    env.close()
    provenance = {
        "generator": "recipes.metaworld.generate", "spec": spec.key(), "task": task, "difficulty": difficulty,
        "goals": "random per episode (MT50-rand), goal visible in obs[36:39]",
        "versions": _library_versions(), "python": sys.version.split()[0],
        "episode_phase": [s["phase"] for s in schedule],
        "episode_eps": [round(s["eps"], 6) for s in schedule],
        "episode_offset_std": [round(s["offset_std"], 6) for s in schedule],
        "episode_noise_std": [round(s["noise_std"], 6) for s in schedule],
        "resumed_from_episode": resumed_from, "generation_seconds": time.perf_counter() - t0,
    }
    data = TaskData.from_episodes(task, episodes, [e["success"] for e in episodes], provenance)
    if is_complete(directory, task):
        # another process (e.g. a parallel sweep job) finished this task meanwhile; same spec and
        # seeds give the same episodes, so its file stands and this one is dropped
        shutil.rmtree(partial, ignore_errors=True)
        return {"task": task, "skipped": True}
    save_task(directory, data)
    shutil.rmtree(partial, ignore_errors=True)
    return {"task": task, "skipped": False, "seconds": time.perf_counter() - t0, "episodes": data.n_episodes,
            "success_rate": float(data.success.mean()), "return_mean": float(data.episode_returns().mean())}


DEMO_EPISODE_BASE = 10**6  # demonstration i uses episode seed stream DEMO_EPISODE_BASE + i


def generate_demos(task: str, spec: GenerationSpec, directory: str | Path, n_demos: int,
                   on_episode: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``n_demos`` expert episodes (the curriculum's expert phase) with their own seeds, stored like a
    task under :func:`demo_dir`. They are not part of the training data: prompts come from them."""
    task, folder = canonical_task(task), demo_dir(directory, n_demos)
    if is_complete(folder, task):
        return {"task": task, "skipped": True}
    t0 = time.perf_counter()
    levels = spec.curriculum.levels(spec.schedule_episodes, spec.schedule_episodes, DIFFICULTY[task])
    env, expert = make_env(task, spec.seed), make_expert(task)
    episodes = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        for i in range(n_demos):
            episodes.append(run_episode(env, expert, episode_rng(spec.seed, task, DEMO_EPISODE_BASE + i), levels,
                                        spec.episode_length))
            if on_episode is not None:
                on_episode(task)
    env.close()
    provenance = {"generator": "recipes.metaworld.generate.generate_demos", "spec": spec.key(), "task": task,
                  "demonstrations": n_demos, "levels": levels, "episode_seed_base": DEMO_EPISODE_BASE,
                  "versions": _library_versions(), "generation_seconds": time.perf_counter() - t0}
    data = TaskData.from_episodes(task, episodes, [e["success"] for e in episodes], provenance)
    if not is_complete(folder, task):  # else another process stored the same episodes meanwhile
        save_task(folder, data)
    return {"task": task, "skipped": False, "demo_success_rate": float(data.success.mean())}


def _task_and_demos(task, spec, directory, checkpoint_every, n_demos, on_episode) -> dict:
    summary = generate_task(task, spec, directory, checkpoint_every, on_episode)
    if n_demos:
        demo = generate_demos(task, spec, directory, n_demos, on_episode)
        summary = {**summary, "skipped": summary["skipped"] and demo["skipped"]}
    return summary


def _is_done(directory: Path, task: str, n_demos: int) -> bool:
    return is_complete(directory, task) and (not n_demos or is_complete(demo_dir(directory, n_demos), task))


# ------------------------------------------------------------------------------- many tasks

_QUEUE = None
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _init_worker(queue) -> None:
    """Worker start: one BLAS/torch thread each (parallel simulation only scales that way)."""
    global _QUEUE
    _QUEUE = queue
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _worker_task(task: str, spec: GenerationSpec, directory: str, checkpoint_every: int, n_demos: int) -> dict:
    return _task_and_demos(task, spec, directory, checkpoint_every, n_demos, on_episode=_QUEUE.put)


def _task_line(summary: Mapping[str, Any]) -> str | None:
    """What one finished task's summary says, for the progress log."""
    if summary.get("seconds") is None:
        return None
    return (f"data: {summary['task']} done, {summary['episodes']} episodes in {summary['seconds']:.1f} s, "
            f"success {summary['success_rate']:.2f}")


class _Quiet:
    """The progress interface doing nothing (``progress=False``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass


def generate_dataset(spec: GenerationSpec, tasks: Sequence[str], directory: str | Path, workers: int = 1,
                     checkpoint_every: int = 10, progress: bool = True, demos: int = 0) -> list[dict]:
    """Generate every task of ``tasks`` not yet complete in ``directory``, ``workers`` processes at a time,
    plus ``demos`` prompt demonstrations per task (:func:`generate_demos`).

    Complete tasks are skipped; interrupted ones resume from their checkpoint. Returns one summary
    per task (``skipped`` for those already there).
    """
    directory = Path(directory)
    tasks = [canonical_task(t) for t in tasks]
    directory.mkdir(parents=True, exist_ok=True)
    gen_file = directory / "generation.json"
    if gen_file.exists():
        stored = json.loads(gen_file.read_text())
        if stored != spec.key():
            raise DatasetError(f"{gen_file} records another generation config than the one asked for; "
                               f"choose another data_root or delete that folder")
    else:
        write_json(gen_file, spec.key())
    pending = [t for t in tasks if not _is_done(directory, t, demos)]
    summaries = [{"task": t, "skipped": True} for t in tasks if t not in pending]
    if not pending:
        return summaries
    total = 0
    for t in pending:
        if not is_complete(directory, t):
            total += spec.n_episodes - min(len(_load_partial(_partial_dir(directory, t), spec)), spec.n_episodes)
        if demos and not is_complete(demo_dir(directory, demos), t):
            total += demos
    from recipes.common import available_cores, phase, say

    workers = min(workers, len(pending), available_cores())  # more processes than cores only contend
    if not progress:
        phase, say = (lambda *a, **k: _Quiet()), (lambda line: None)
    label = f"data: {spec.composition}, {len(pending)} tasks"
    with phase(label, total, unit="episodes", detail=f"{spec.episode_length} steps each, into {directory}, "
                                                     f"{workers} process{'es' if workers > 1 else ''}") as bar:
        if workers <= 1:
            for t in pending:
                summary = _task_and_demos(t, spec, directory, checkpoint_every, demos,
                                          on_episode=lambda _: bar.advance())
                summaries.append(summary)
                if _task_line(summary):
                    say(_task_line(summary))
        else:
            summaries += _generate_parallel(pending, spec, directory, workers, checkpoint_every, demos, bar, say)
    order = {t: i for i, t in enumerate(tasks)}
    return sorted(summaries, key=lambda s: order[s["task"]])


def _generate_parallel(tasks, spec, directory, workers, checkpoint_every, n_demos, bar, say) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    os.environ.update({v: "1" for v in _THREAD_VARS})  # children read these when numpy first loads
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    results = []
    with pool:
        futures = {pool.submit(_worker_task, t, spec, str(directory), checkpoint_every, n_demos) for t in tasks}
        try:
            while futures:
                finished, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in finished:
                    results.append(fut.result())  # re-raises a worker's error here
                    if _task_line(results[-1]):
                        say(_task_line(results[-1]))
                while True:
                    try:
                        queue.get_nowait()
                    except Empty:
                        break
                    bar.advance()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
