"""``python tools/bench.py sampler``: Decision Transformer segments per second on one core.

Runs on a synthetic dataset of the MT10 shape (10 tasks, 500-step episodes, 39-d states) unless
``data_dir=<dataset folder>`` names generated data; the speed does not depend on the values. The
baseline is :class:`ReferenceSampler` (a Python loop per sample) on the same indices.
"""

from __future__ import annotations

import time

import numpy as np

from recipes.metaworld.sampler import ReferenceSampler, SamplingConfig, SegmentSampler
from recipes.metaworld.storage import OfflineDataset, TaskData, load_dataset
from recipes.metaworld.tasksets import taskset


def synthetic_dataset(n_tasks: int = 10, episodes: int = 100, length: int = 500, obs_dim: int = 39,
                      act_dim: int = 4, seed: int = 0) -> OfflineDataset:
    rng = np.random.default_rng(seed)
    tasks = taskset("MT50")[:n_tasks]
    data = {}
    for t in tasks:
        n = episodes * length
        data[t] = TaskData(t, rng.normal(size=(n, obs_dim)).astype(np.float32),
                           rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                           rng.uniform(0, 10, n).astype(np.float32),
                           np.arange(0, n + 1, length, dtype=np.int64), rng.random(episodes) < 0.5)
    return OfflineDataset(tasks, data)


def _rate(fn, seconds: float, per_call: int) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += per_call
    return n / (time.perf_counter() - t0)


def sampler(batch_size: int = 256, seconds: float = 3.0, data_dir: str | None = None, episodes: int = 100) -> dict:
    if data_dir:
        dataset = load_dataset(data_dir, taskset("MT10"))
    else:
        dataset = synthetic_dataset(episodes=episodes)
    config = SamplingConfig(prompt_episode="random", prompt_position="random")  # the costlier prompt path
    fast, slow = SegmentSampler(dataset, config), ReferenceSampler(dataset, config)
    rng = np.random.default_rng(0)
    n_tasks = len(dataset.tasks)
    fast_rate = _rate(lambda: fast.sample(rng.integers(0, n_tasks, batch_size), rng), seconds, batch_size)
    index = fast.draw(rng.integers(0, n_tasks, batch_size), rng)
    slow_rate = _rate(lambda: slow.gather(index), seconds, batch_size)
    return {"segments_per_s": round(fast_rate), "reference_segments_per_s": round(slow_rate),
            "speedup": round(fast_rate / slow_rate, 1), "batch_size": batch_size,
            "context": config.context, "prompt_length": config.prompt_length,
            "transitions": int(sum(dataset[t].n_transitions for t in dataset.tasks)),
            "data": data_dir or "synthetic MT10 shape", "target_segments_per_s": 20000}
