"""Return per task against the task's goal, per method, from finished locomotion runs:

    python -m recipes.locomotion.figure RUNS... --data DATA_DIR --out returns.png

RUNS are run folders or folders holding them (every ``results.json`` below is read; runs of other
benchmarks or families are refused). For each method (``results.json``'s ``method``) the figure
plots, against each task's goal (Cheetah-vel: target velocity; Cheetah-dir: direction; Ant-dir:
angle), the mean over seeds of the task's final return, with the seeds' range as a band; tasks
evaluated with the voting mask (``unseen``) are drawn with open markers. The behaviour data's mean
episode return per task (the ``<task>.json`` sidecars in DATA_DIR, and its ``demos-*`` folder for
tasks without training data) is the reference line; for Cheetah-vel, so is the return of standing
still (−goal per step). The PNG is written atomically and never
replaces an existing file; errors name the folder or file and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from recipes.locomotion.tasks import EPISODE_LENGTH, goals, parse_task


class FigureError(ValueError):
    """A run folder, data folder or output this tool cannot use (the message names it)."""


def read_runs(paths: list[Path]) -> tuple[str, dict[str, dict[str, dict[str, list[float]]]]]:
    """The family, and method -> {"train" | "unseen"} -> task -> final returns (one per run)."""
    found = sorted({p for root in paths for p in ([root / "results.json"] if (root / "results.json").is_file()
                                                  else root.rglob("results.json"))})
    if not found:
        raise FigureError(f"no results.json under {', '.join(map(str, paths))}")
    family, out = None, defaultdict(lambda: {"train": defaultdict(list), "unseen": defaultdict(list)})
    for f in found:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FigureError(f"{f}: not a results file ({e})") from e
        if r.get("benchmark") != "locomotion":
            raise FigureError(f"{f}: benchmark {r.get('benchmark')!r}, expected a locomotion run")
        fams = {parse_task(t)[0] for t in r["tasks"]}
        family = family or next(iter(fams))
        if fams != {family}:
            raise FigureError(f"{f}: tasks of {sorted(fams)}, earlier runs of {family!r}; one figure takes one family")
        for t, v in r["per_task"].items():
            out[r["method"]]["train"][t].append(float(v["return"]))
        for t, v in ((r.get("unseen") or {}).get("per_task") or {}).items():
            out[r["method"]]["unseen"][t].append(float(v["return"]))
    return family, out


def data_returns(data_dir: Path) -> dict[str, float]:
    """Task -> the data's mean episode return (training tasks' sidecars, then demonstrations for the rest)."""
    if not data_dir.is_dir():
        raise FigureError(f"--data {data_dir}: not a folder (expected a locomotion dataset folder)")
    out = {}
    for f in sorted(data_dir.glob("*.json")) + sorted(data_dir.glob("demos-*/*.json")):
        try:
            side = json.loads(f.read_text())
            out.setdefault(side["task"], float(side["stats"]["return_mean"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FigureError(f"{f}: not a dataset sidecar ({e})") from e
    if not out:
        raise FigureError(f"--data {data_dir}: no <task>.json sidecars")
    return out


def plot(family: str, runs: dict, data: dict[str, float], out: Path, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recipes.common import save_figure

    goal = goals(family)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ref = sorted((goal[parse_task(t)[1]], v) for t, v in data.items())
    ax.plot([g for g, _ in ref], [v for _, v in ref], color="0.3", ls="--", lw=1, label="behaviour data (mean)")
    if family == "cheetah_vel":  # reward −|v − goal| − 0.05·Σa²: a cheetah standing still gets −goal per step
        ax.plot([g for g, _ in ref], [-g * EPISODE_LENGTH for g, _ in ref], color="0.6", ls=":", lw=1,
                label=f"standing still (−{EPISODE_LENGTH}·goal)")
    for k, (method, parts) in enumerate(sorted(runs.items())):
        color = f"C{k}"
        pts = sorted((goal[parse_task(t)[1]], t, np.asarray(v)) for part in ("train", "unseen")
                     for t, v in parts[part].items())
        xs = [g for g, _, _ in pts]
        n = min(len(v) for _, _, v in pts)
        ax.plot(xs, [v.mean() for _, _, v in pts], color=color, lw=1.2, label=f"{method} ({n} seeds)")
        ax.fill_between(xs, [v.min() for _, _, v in pts], [v.max() for _, _, v in pts], color=color, alpha=0.15, lw=0)
        for part, face in (("train", color), ("unseen", "none")):
            sel = [(g, v.mean()) for g, t, v in pts if t in parts[part]]
            if sel:
                ax.scatter(*zip(*sel), s=18, facecolors=face, edgecolors=color, zorder=3)
    ax.scatter([], [], s=18, facecolors="none", edgecolors="0.3", label="unseen task (voting mask)")
    ax.set_xlabel({"cheetah_vel": "target velocity (m/s)", "cheetah_dir": "direction",
                   "ant_dir": "goal angle (rad)"}.get(family, "goal"))
    ax.set_ylabel("return (final evaluation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out, title or f"{family}: return per task (mean over seeds, band: min-max)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.locomotion.figure", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding them")
    p.add_argument("--data", type=Path, required=True, help="the dataset folder the runs trained on")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (must not exist)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        if args.out.exists():
            raise FigureError(f"--out {args.out} exists; choose another name (nothing is replaced)")
        family, runs = read_runs(args.runs)
        plot(family, runs, data_returns(args.data), args.out, args.title)
    except FigureError as e:
        print(f"figure: error: {e}", file=sys.stderr)
        return 1
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
