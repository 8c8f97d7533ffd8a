"""Groupers (G-HarmoDT, Algorithm 4): cluster tasks into mask groups from per-task score vectors.

Group ids are renumbered in order of first appearance over the task list, so the same partition
always gets the same ids whatever labels the clustering produced.
"""

from __future__ import annotations

import numpy as np
import torch


def canonical_groups(labels) -> list[int]:
    """Renumber labels by first appearance: [2, 2, 0, 1] -> [0, 0, 1, 2]."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(l), len(seen)) for l in labels]


class NoneGrouper:
    """No grouping: each task is its own group (plain HarmoDT)."""

    def group(self, task_vectors: torch.Tensor, seed: int) -> list[int]:
        return list(range(task_vectors.shape[0]))

    def n_groups(self, n_tasks: int) -> int:
        return n_tasks


class KNNGrouper:
    """Clusters the tasks' score vectors into ``n_groups`` groups.

    The journal calls its grouping "kNN"; the algorithms offered (scikit-learn, seeded):
    ``kmeans`` (k-means, default), ``agglomerative`` (Ward linkage), ``knn_graph`` (spectral
    clustering on a k-nearest-neighbour affinity graph, ``n_neighbors`` neighbours).

    Args:
        n_groups: N^G, number of groups (2 <= N^G <= number of tasks).
        algorithm: one of the above.
        normalize: scale each task vector to unit L2 norm first (compares directions, not sizes).
        n_neighbors: neighbours for ``knn_graph``.
    """

    ALGORITHMS = ("kmeans", "agglomerative", "knn_graph")

    def __init__(self, n_groups: int = 5, algorithm: str = "kmeans", normalize: bool = True, n_neighbors: int = 5):
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"grouper.algorithm must be one of {self.ALGORITHMS}, got {algorithm!r}")
        if int(n_groups) < 1:
            raise ValueError(f"grouper.n_groups must be >= 1, got {n_groups}")
        self.k, self.algorithm, self.normalize, self.n_neighbors = int(n_groups), algorithm, bool(normalize), int(n_neighbors)

    def n_groups(self, n_tasks: int) -> int:
        if self.k > n_tasks:
            raise ValueError(f"grouper.n_groups={self.k} exceeds the number of tasks ({n_tasks})")
        return self.k

    def group(self, task_vectors: torch.Tensor, seed: int) -> list[int]:
        x = task_vectors.detach().double().cpu().reshape(task_vectors.shape[0], -1).numpy()
        n = x.shape[0]
        k = self.n_groups(n)
        if not np.isfinite(x).all():
            raise ValueError("grouper: task score vectors contain NaN or inf")
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        if k == 1:
            return [0] * n
        if k == n:
            return list(range(n))
        if self.algorithm == "kmeans":
            from sklearn.cluster import KMeans
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        elif self.algorithm == "agglomerative":
            from sklearn.cluster import AgglomerativeClustering
            labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        else:
            from sklearn.cluster import SpectralClustering
            labels = SpectralClustering(n_clusters=k, affinity="nearest_neighbors",
                                        n_neighbors=min(self.n_neighbors, n - 1), random_state=seed,
                                        assign_labels="cluster_qr").fit_predict(x)
        groups = canonical_groups(labels)
        if len(set(groups)) != k:
            raise ValueError(f"grouper.algorithm={self.algorithm!r} produced {len(set(groups))} non-empty groups, "
                             f"expected {k}")
        return groups
