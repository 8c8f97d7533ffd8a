"""G-HarmoDT pictures: the tasks' harmony vectors (journal Fig. 7b) and the gate's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recipes.common import save_figure


def plot_grouping(record: dict, png: Path, title: str, seed: int = 0) -> None:
    """Left: cosine distances between the tasks' harmony vectors GH(T_i, 1), tasks sorted by group.
    Right: t-SNE of the same distances, colour = group (needs >= 4 tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, groups = record["tasks"], np.asarray(record["task_to_group"])
    dist = np.asarray(record["cosine_distance"], dtype=np.float64)
    order = np.argsort(groups, kind="stable")
    short = [t.removesuffix("-v3") for t in tasks]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    im = axes[0].imshow(dist[np.ix_(order, order)], cmap="magma")
    axes[0].set_xticks(range(len(tasks)), [f"{short[i]} ({groups[i]})" for i in order], rotation=90, fontsize=6)
    axes[0].set_yticks(range(len(tasks)), [f"{short[i]} ({groups[i]})" for i in order], fontsize=6)
    axes[0].set_title(f"cosine distance of harmony vectors at step {record['step']} (group)")
    fig.colorbar(im, ax=axes[0], fraction=0.03)
    if len(tasks) >= 4:
        from sklearn.manifold import TSNE

        d = dist.copy()
        np.fill_diagonal(d, 0.0)
        xy = TSNE(n_components=2, metric="precomputed", init="random", random_state=seed,
                  perplexity=min(5.0, len(tasks) - 1.0)).fit_transform(d)
        axes[1].scatter(xy[:, 0], xy[:, 1], c=groups, cmap="tab10", s=40)
        for (x, y), name in zip(xy, short):
            axes[1].annotate(name, (x, y), fontsize=6)
        axes[1].set_title("t-SNE of the tasks' harmony vectors, colour = group")
    else:
        axes[1].text(0.5, 0.5, "t-SNE needs at least 4 tasks", ha="center", va="center")
        axes[1].set_axis_off()
    save_figure(fig, png, title)


def plot_gate(report: dict, png: Path, title: str) -> None:
    """Gate accuracy per label: on held-out data episodes and in the evaluation episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["heldout"]["per_label"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4))
    for k, (name, width) in enumerate((("heldout", -0.2), ("rollout", 0.2))):
        vals = [report[name]["per_label"][lab] for lab in labels]
        ax.bar(x + width, [np.nan if v is None else v for v in vals], width=0.4,
               label=f"{name} (overall {report[name]['overall'] if report[name]['overall'] is not None else float('nan'):.2f})")
    names = [", ".join(t.removesuffix("-v3") for t in report["labels"][lab]) for lab in labels]
    ax.set_xticks(x, [f"{lab}: {n}" if len(n) < 40 else f"{lab}: {n[:38]}…" for lab, n in zip(labels, names)],
                  rotation=60, ha="right", fontsize=6)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title=f"gate accuracy per {report['target']}")
    ax.legend(fontsize=7)
    save_figure(fig, png, title)
