"""Data and model of the digits recipe: scikit-learn's 8×8 digits relabelled into conflicting tasks.

Every task sees the same images but maps the ten digits to the ten outputs of one shared head in
its own way, so tasks pull the shared head (and the layers feeding it) in opposite directions.
Task names: ``digit`` (y), ``reverse`` (9 − y), ``shiftK`` ((y + K) mod 10, K = 1..9),
``parity`` (y mod 2), ``large`` (y ≥ 5). The model gets the task id as an embedding added to its
first hidden layer (as MTDT adds a task embedding), so a dense model can in principle solve all;
with ``model.task_input=false`` it does not, and only the masks tell the tasks apart.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn


def relabel(task: str, y: np.ndarray) -> np.ndarray:
    if task == "digit":
        return y
    if task == "reverse":
        return 9 - y
    if task == "parity":
        return y % 2
    if task == "large":
        return (y >= 5).astype(y.dtype)
    m = re.fullmatch(r"shift([1-9])", task)
    if m:
        return (y + int(m.group(1))) % 10
    raise ValueError(f"tasks: unknown digits task {task!r}; expected digit, reverse, parity, large or shift1..shift9")


class DigitsTasks:
    """Train/test split of the digits images (same split for every task) and per-task labels.

    Shapes: ``x_train`` [n_train, 64] float32 in [0, 1]; ``y_train`` [N_tasks, n_train] int64.
    """

    def __init__(self, tasks: list[str], test_fraction: float, seed: int, limit: int | None = None):
        from sklearn.datasets import load_digits

        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(y))
        if limit is not None:
            order = order[:limit]
        n_test = max(1, int(round(test_fraction * len(order))))
        test, train = order[:n_test], order[n_test:]
        labels = np.stack([relabel(t, y) for t in tasks])  # [N, n_images]
        self.tasks = list(tasks)
        self.x_train = torch.from_numpy(x[train] / 16.0).float()
        self.x_test = torch.from_numpy(x[test] / 16.0).float()
        self.y_train = torch.from_numpy(labels[:, train]).long()
        self.y_test = torch.from_numpy(labels[:, test]).long()

    def batch(self, task: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.x_train.shape[0], (batch_size,), generator=generator)
        return self.x_train[idx], self.y_train[task, idx]


class MultiTaskMLP(nn.Module):
    """x [B, 64], task [B] -> logits [B, 10]; ReLU MLP with a task embedding on the first layer."""

    def __init__(self, n_in: int, n_tasks: int, hidden: int, depth: int, n_out: int = 10, dropout: float = 0.0,
                 task_input: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {depth}")
        # Without the task input, only the masks tell the tasks apart.
        self.task_embed = nn.Embedding(n_tasks, hidden) if task_input else None
        self.inp = nn.Linear(n_in, hidden)
        self.body = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.head = nn.Linear(hidden, n_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, hidden)
        if self.task_embed is not None:
            h = h + self.task_embed(task)
        h = torch.relu(h)
        for layer in self.body:
            h = torch.relu(layer(self.drop(h)))
        return self.head(self.drop(h))  # (B, n_out)
