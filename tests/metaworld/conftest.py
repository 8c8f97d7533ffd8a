from __future__ import annotations

import numpy as np
import pytest

from recipes.metaworld.storage import OfflineDataset, TaskData


def _make_task(task: str, lengths, obs_dim: int = 39, act_dim: int = 4, seed: int = 0, success=True) -> TaskData:
    """Synthetic task data with episodes of the given lengths (values random, rewards >= 0)."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    return TaskData(task, rng.normal(size=(n, obs_dim)).astype(np.float32),
                    rng.uniform(-1, 1, (n, act_dim)).astype(np.float32), rng.uniform(0, 10, n).astype(np.float32),
                    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    (rng.random(len(lengths)) < 0.5) if success else None, {"made_by": "test"})


@pytest.fixture
def make_task():
    return _make_task


@pytest.fixture
def synthetic():
    """Two tasks with uneven episode lengths (some shorter than K=20 and K*=5)."""
    return OfflineDataset(["reach-v3", "push-v3"], {
        "reach-v3": _make_task("reach-v3", [30, 3, 25, 50, 7, 40, 22], seed=1),
        "push-v3": _make_task("push-v3", [12, 60, 4, 33, 18, 26], seed=2),
    })
