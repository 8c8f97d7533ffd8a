#!/usr/bin/env python
"""Aggregate a sweep's runs into the papers' table shape, with curves.

    python tools/report.py multirun/digits/2026-01-01_12-00-00
    python tools/report.py SWEEP --rows scorer --cols variant --metric accuracy
    python tools/report.py SWEEP --rows method --baseline method=harmodt_r --ci bootstrap

Each run folder (one per job, found anywhere under SWEEP) is read from ``results.json`` when the
run finished, else from the last evaluation in its ``metrics.jsonl`` (the run is then *partial*: still
running, preempted, or failed). A run's factors are its config-group choices (``scorer=fisher``…),
its command-line overrides (``train.steps=…``), ``seed`` and its task set (``tasks``).

Table: rows = method (``--rows``; default: whichever of method, variant, scorer, initializer,
scheduler, grouper vary over the sweep, less those another of them determines: a method file's
scheduler), columns = task set × data composition (``--cols``; default: every other factor that
varies, except the seed and those the rows determine), cell = mean ± sample std over seeds of the run's mean
over tasks of ``--metric`` (default: the recipe's headline metric), with n, and a 95 % confidence
interval of that mean over seeds (none with n < 2): ``--ci t`` (default) shows the t-interval
mean ± t_{0.975, n−1}·std/√n, ``--ci bootstrap`` the bootstrap percentile interval (B = 10,000
resamples of the seeds with replacement, drawn by ``numpy.random.default_rng(0)`` afresh for each
cell, 2.5th and 97.5th percentiles of the resampled means); the CSV has both. A cell holding partial
runs is marked ``*``.

``--baseline KEY=VALUE[,KEY=VALUE…]`` (keys among the row factors) adds paired differences: each
cell is compared with the cell of the same column whose row has those values (the other row
factors equal), seed by seed (a seed's runs averaged if a cell has several), and the mean
difference over the seeds both have is shown with its 95 % interval (the same ``--ci``) in a second
table, in the Markdown, in the CSV (``diff_*`` columns) and in the PNG; seeds without a partner are
left out of the pairs and listed in the notes (and in the CSV). Printed as a rich table; written (never overwriting anything) as Markdown,
CSV (one line per cell) and a PNG of the metric vs step, mean over seeds with a ±1 std band, above
the cells' means with their intervals as error bars (and, with ``--baseline``, the differences). For
task-agnostic sweeps (g_harmodt), ``_groups.png`` plots the metric and the gate's accuracy vs the
number of groups per method.

One broken run does not block a sweep's report: a run folder whose ``results.json`` is not a
run's results (not JSON, not an object, missing or mistyped keys) or whose ``.hydra/*.yaml`` does
not parse is left out, and a ``metrics.jsonl`` line that is not a metrics row leaves out that
run's curve (a partial run, whose log is all it has, is left out); each is a warning naming the
file (and line) in the notes under the table. A truncated last line of ``metrics.jsonl`` (a job
still writing) is skipped silently. Errors (one line on stderr, nothing written): status 2 for
a malformed command line (argparse), 1 for a SWEEP that is missing or holds no usable run,
``--rows``/``--cols``/``--metric``/``--baseline`` naming what the runs do not have (a ``--metric`` that
some finished runs have leaves the others out, with a warning each: e.g. ``unseen_return``, which
runs without unseen tasks lack), or a report file that exists.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from maskmtl.masks import atomic_write_bytes
from maskmtl.outputs import MetricsError, read_metrics

METHOD_KEYS = ("method", "variant", "scorer", "initializer", "scheduler", "grouper")
CI_LEVEL = 0.95
BOOTSTRAP_B = 10_000
BOOTSTRAP_SEED = 0
CI_KINDS = {"t": "t-interval", "bootstrap": f"bootstrap percentile, B={BOOTSTRAP_B:,}"}
NOT_FACTORS = {"seed", "recipe", "debug"}


class ReportError(RuntimeError):
    pass


class BrokenRun(ReportError):
    """One run folder whose files cannot be read: the run is left out of the report, with a note."""


@dataclass
class Run:
    path: Path
    factors: dict[str, str]
    seed: str
    tasks: list[str]
    complete: bool
    value: float | None = None           # mean over tasks of the metric (final, or last eval if partial)
    step: int | None = None              # steps done (final) or step of the last evaluation
    curve: dict[int, float] = field(default_factory=dict)  # step -> mean over tasks at each evaluation


# ---------------------------------------------------------------------------------------------- reading
def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml's parser errors, or OmegaConf's (not a mapping, bad interpolation)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BrokenRun(f"{path} is not readable YAML ({first[:200]})") from None
    if not isinstance(cfg, dict):
        raise BrokenRun(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    return cfg


def _hydra_factors(path: Path) -> tuple[dict[str, str], str | None]:
    """Group choices and command-line overrides from ``.hydra/hydra.yaml``: (factors, seed)."""
    factors: dict[str, str] = {}
    seed = None
    try:
        h = _load_yaml(path)["hydra"]
        choices, overrides = h["runtime"]["choices"], h["overrides"]["task"]
        if not isinstance(choices, dict) or not isinstance(overrides, list):
            raise TypeError
    except (KeyError, TypeError):
        raise BrokenRun(f"{path}: expected hydra.runtime.choices (a mapping) and hydra.overrides.task (a list), "
                        f"as Hydra writes them") from None
    factors.update({k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None})
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key == "seed":
            seed = value
        elif not key.startswith("hydra"):
            factors.setdefault(key, value)
    return factors, seed


def _read_results(path: Path) -> dict:
    """A run's ``results.json``, checked for what the report reads; BrokenRun naming the file."""
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BrokenRun(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"expected the results a finished run writes") from None
    except (UnicodeDecodeError, OSError) as e:
        raise BrokenRun(f"{path} cannot be read ({e})") from None
    if not isinstance(r, dict):
        raise BrokenRun(f"{path}: expected a JSON object (a run's results), got {type(r).__name__}")
    expected = {"seed": "an integer", "tasks": "a list of task names", "mean": "an object metric -> value",
                "steps": "an integer", "headline": "an object with the headline metric's name"}
    missing = [k for k in expected if k not in r]
    if missing:
        raise BrokenRun(f"{path}: missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                        f"(expected {'; '.join(f'{k}: {expected[k]}' for k in missing)})")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    checks = {"seed": is_int(r["seed"]),
              "tasks": isinstance(r["tasks"], list) and all(isinstance(t, str) for t in r["tasks"]),
              "mean": isinstance(r["mean"], dict),
              "steps": is_int(r["steps"]),
              "headline": isinstance(r["headline"], dict) and isinstance(r["headline"].get("name"), str)}
    for key, ok in checks.items():
        if not ok:
            raise BrokenRun(f"{path}: {key!r} is {json.dumps(r[key])[:80]}, expected {expected[key]}")
    if not isinstance(r.get("options", {}), dict):
        raise BrokenRun(f"{path}: 'options' is {json.dumps(r['options'])[:80]}, expected an object group -> choice")
    return r


def _factors(run_dir: Path, results: dict | None) -> tuple[dict[str, str], str, list[str]]:
    """(factors, seed, tasks) of a run: group choices + command-line overrides."""
    factors: dict[str, str] = {}
    seed, tasks = None, None
    hydra_yaml, config_yaml = run_dir / ".hydra" / "hydra.yaml", run_dir / ".hydra" / "config.yaml"
    if hydra_yaml.exists():
        factors, seed = _hydra_factors(hydra_yaml)
    if results is None and config_yaml.exists():  # a finished run's results.json says its seed and tasks
        cfg = _load_yaml(config_yaml)
        seed = str(cfg["seed"]) if cfg.get("seed") is not None else seed
        tasks = cfg.get("tasks")
        if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
            raise BrokenRun(f"{config_yaml}: tasks is {tasks!r}, expected a list of task names")
    if results is not None:
        factors.update({k: str(v) for k, v in results.get("options", {}).items()})
        seed, tasks = str(results["seed"]), results["tasks"]
    if seed is None or tasks is None:
        raise BrokenRun(f"{run_dir}: neither results.json nor .hydra/config.yaml says its seed and tasks")
    factors["tasks"] = "+".join(tasks)
    return {k: v for k, v in factors.items() if k not in NOT_FACTORS}, seed, list(tasks)


def _log_rows(metrics_path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (none without one). A truncated last line (a running
    job's) is skipped; any other bad line is a ``MetricsError`` naming the file and line."""
    return read_metrics(metrics_path) if metrics_path.exists() else []


def _logged_metrics(rows: list[dict]) -> set[str]:
    """Per-task metric names logged as ``eval/<task>/<name>``."""
    return {k.split("/", 2)[2] for row in rows for k in row if k.count("/") == 2 and k.startswith("eval/")}


def _fit(label: str, width: int = 30) -> str:
    """A panel title that fits its panel: long labels (a task set) shortened in the middle."""
    return label if len(label) <= width else f"{label[:width // 2 - 1]}…{label[-(width // 2 - 1):]}"


def _logged_tasks(rows: list[dict], metric: str) -> list[str]:
    """The tasks a log has ``eval/<task>/<metric>`` for, in the order it logged them."""
    return list(dict.fromkeys(k.split("/")[1] for row in rows for k in row
                              if k.count("/") == 2 and k.startswith("eval/") and k.endswith(f"/{metric}")))


def _curve_of(rows: list[dict], tasks: list[str], metric: str) -> dict[int, float]:
    curve = {}
    for row in rows:
        # tasks unknown before the run ends (recipes that take them from their data): every task logged
        keys = [f"eval/{t}/{metric}" for t in tasks] or [k for k in row if k.count("/") == 2
                                                       and k.startswith("eval/") and k.endswith(f"/{metric}")]
        vals = [row.get(k) for k in keys]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            curve[int(row["step"])] = sum(vals) / len(vals)
    return curve


def _curve(metrics_path: Path, tasks: list[str], metric: str) -> dict[int, float]:
    return _curve_of(_log_rows(metrics_path), tasks, metric)


def find_run_dirs(sweep: Path) -> list[Path]:
    found = {p.parent for name in ("results.json", "metrics.jsonl", ".hydra/config.yaml") for p in sweep.rglob(name)}
    found = {d.parent if d.name == ".hydra" else d for d in found}
    return sorted((d for d in found if ".submitit" not in d.parts and "reports" not in d.relative_to(sweep).parts),
                  key=lambda d: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in d.relative_to(sweep).parts])


def metric_name(sweep_runs: list[tuple[Path, dict | None]], requested: str | None) -> str:
    if requested:
        return requested
    names = {r["headline"]["name"] for _, r in sweep_runs if r is not None}
    if len(names) == 1:
        return names.pop()
    if len(names) > 1:
        raise ReportError(f"runs have different headline metrics {sorted(names)}: choose one with --metric")
    keys = set()  # only partial runs: metric names logged as eval/<task>/<name>
    for d, _ in sweep_runs:
        try:
            keys |= _logged_metrics(_log_rows(d / "metrics.jsonl"))
        except MetricsError:  # noted when the run is read
            continue
    if len(keys) != 1:
        raise ReportError(f"no finished run names the headline metric and the logs hold {sorted(keys) or 'none'}: "
                          f"choose one with --metric")
    return keys.pop()


def load_runs(sweep: Path, metric: str | None = None) -> tuple[list[Run], str, list[str]]:
    """All runs under ``sweep``, the metric used, and warnings (runs that could not be used)."""
    if not sweep.is_dir():
        raise ReportError(f"{sweep} is not a folder (expected a multirun folder, e.g. multirun/<recipe>/<time>)")
    dirs = find_run_dirs(sweep)
    if not dirs:
        raise ReportError(f"{sweep} holds no run folders (no results.json, metrics.jsonl or .hydra/config.yaml)")
    raw, warnings = [], []
    for d in dirs:
        try:
            raw.append((d, _read_results(d / "results.json") if (d / "results.json").exists() else None))
        except BrokenRun as e:
            warnings.append(f"{e}: left out")
    if not raw:
        return [], metric or "", warnings
    requested = metric
    metric = metric_name(raw, metric)
    some_have_it = any(r is not None and metric in r["mean"] for _, r in raw)  # finished runs with the metric
    runs = []
    for d, results in raw:
        try:
            factors, seed, tasks = _factors(d, results)
        except BrokenRun as e:
            warnings.append(f"{e}: left out")
            continue
        try:
            rows = _log_rows(d / "metrics.jsonl")
        except MetricsError as e:
            if results is None:
                warnings.append(f"{e}: {d} left out (a partial run: its log is all it has)")
                continue
            warnings.append(f"{e}: {d}'s curve left out (its table value is from results.json)")
            rows = []
        if not tasks and results is None:  # a running job of a recipe that takes its tasks from its data
            tasks = _logged_tasks(rows, metric)
            factors["tasks"] = "+".join(tasks)
        run = Run(d, factors, seed, tasks, complete=results is not None, curve=_curve_of(rows, tasks, metric))
        if results is not None:
            if metric not in results["mean"]:
                if requested and not some_have_it:
                    raise ReportError(f"--metric: {d / 'results.json'} has no metric {metric!r} "
                                      f"(it has {sorted(results['mean'])})")
                # some runs have it (e.g. unseen_return: MTDT evaluates no unseen task): leave this one out
                warnings.append(f"{d / 'results.json'} has no metric {metric!r} (it has {sorted(results['mean'])}): "
                                f"left out")
                continue
            value = results["mean"][metric]
            if value is None:  # written as null: NaN or inf
                warnings.append(f"{d / 'results.json'}: mean {metric} is null (NaN or inf: did the run diverge?); "
                                f"counted as NaN")
                value = math.nan
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                warnings.append(f"{d / 'results.json'}: mean {metric} is {json.dumps(value)[:40]}, expected a "
                                f"number: left out")
                continue
            run.value, run.step = float(value), int(results["steps"])
        elif run.curve:
            run.step = max(run.curve)
            run.value = run.curve[run.step]
        else:
            logged = _logged_metrics(rows)
            if requested and logged and not some_have_it:
                raise ReportError(f"--metric: {d / 'metrics.jsonl'} logs no metric {metric!r} "
                                  f"(it logs {sorted(logged)})")
            warnings.append(f"{d}: no results.json and no evaluation of {metric} logged yet: left out")
            continue
        runs.append(run)
    return runs, metric, warnings


# ---------------------------------------------------------------------------------------------- table
def default_keys(runs: list[Run], rows: list[str] | None, cols: list[str] | None) -> tuple[list[str], list[str]]:
    varying = sorted({k for r in runs for k in r.factors if len({x.factors.get(k) for x in runs}) > 1})
    present = {k for r in runs for k in r.factors}
    for given, flag in ((rows, "--rows"), (cols, "--cols")):
        for k in given or []:
            if k not in present:
                raise ReportError(f"{flag}: {k!r} is not a factor of these runs (factors: {sorted(present)})")
    def determined(k: str, by: list[str]) -> bool:
        """``k`` takes one value for each combination of ``by`` (method=harmodt_r fixes scheduler=frozen)."""
        seen: dict[tuple, set] = {}
        for r in runs:
            seen.setdefault(tuple(r.factors.get(b) for b in by), set()).add(r.factors.get(k))
        return bool(by) and all(len(v) == 1 for v in seen.values())

    if rows is None:
        rows = []
        for k in (k for k in METHOD_KEYS if k in varying):
            if not determined(k, rows):  # a group the method file sets is not a row of its own
                rows.append(k)
        rows = rows or [next((k for k in METHOD_KEYS if k in present), "tasks")]
    if cols is None:
        cols = [k for k in varying if k not in rows and not determined(k, rows)] or \
            [k for k in ("tasks",) if k not in rows]
    return rows, cols


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def t_interval(values: list[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """The t-interval of the mean: mean ± t_{(1+level)/2, n−1} · s/√n (s: sample std). ``None``
    with fewer than 2 values or a non-finite one."""
    from scipy.stats import t

    n = len(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return None
    mean, std = _stats(values)
    half = float(t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(values: list[float], level: float = CI_LEVEL, b: int = BOOTSTRAP_B,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Bootstrap percentile interval of the mean: ``b`` resamples of the values with replacement
    (indices ``numpy.random.default_rng(seed).integers(0, n, (b, n))``), the (1−level)/2 and
    (1+level)/2 percentiles (numpy's default, linear) of their means. ``None`` as ``t_interval``."""
    import numpy as np

    n = len(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(b, n))
    means = np.asarray(values, dtype=np.float64)[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _intervals(values: list[float]) -> dict[str, tuple[float, float] | None]:
    return {"t": t_interval(values), "bootstrap": bootstrap_interval(values)}


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def aggregate(runs: list[Run], rows: list[str], cols: list[str]) -> list[dict]:
    """One dict per (row, column) cell: keys, mean, std (sample, over seeds), n, partial, seeds,
    ``ci`` (``{"t": (lo, hi), "bootstrap": (lo, hi)}``, ``None`` each when n < 2) and
    ``by_seed`` (seed -> the mean of that seed's runs, for pairing)."""
    cells: dict[tuple, list[Run]] = {}
    for r in runs:
        key = (tuple(r.factors.get(k, "-") for k in rows), tuple(r.factors.get(k, "-") for k in cols))
        cells.setdefault(key, []).append(r)
    out = []
    for (rk, ck), rs in sorted(cells.items()):
        values = [r.value for r in rs]
        mean, std = _stats(values)
        per_seed: dict[str, list[float]] = {}
        for r in rs:
            per_seed.setdefault(r.seed, []).append(r.value)
        out.append({"row": dict(zip(rows, rk)), "col": dict(zip(cols, ck)), "mean": mean, "std": std, "n": len(rs),
                    "partial": sum(not r.complete for r in rs), "seeds": sorted(r.seed for r in rs), "runs": rs,
                    "ci": _intervals(values),
                    "by_seed": {k: sum(v) / len(v) for k, v in sorted(per_seed.items(), key=lambda kv: _seed_key(kv[0]))},
                    "seed_runs": {k: len(v) for k, v in per_seed.items()}, "diff": None})
    return out


def pair_with_baseline(cells: list[dict], rows: list[str], baseline: dict[str, str]) -> list[str]:
    """Set each cell's ``diff``: the paired difference (cell − baseline cell) over the seeds both
    cells have, the baseline cell being the one of the same column whose row has ``baseline``'s
    values and the cell's own values for the other row factors. ``diff`` is ``{"baseline": label,
    "self": True}`` for a baseline cell itself, ``{"baseline": label, "missing": True}`` when the
    column has no such cell, else ``{"baseline", "n", "mean", "std", "values", "ci", "unpaired"
    (the cell's seeds without a baseline run), "baseline_only" (the reverse)}``. Returns notes."""
    for k in baseline:
        if k not in rows:
            raise ReportError(f"--baseline: {k!r} is not a row factor (rows: {', '.join(rows)}); "
                              f"name the rows with --rows")
        present = sorted({c["row"][k] for c in cells})
        if baseline[k] not in present:
            raise ReportError(f"--baseline: no row has {k}={baseline[k]} (values of {k}: {', '.join(present)})")
    index = {(tuple(c["row"].values()), _label(c["col"])): c for c in cells}
    notes = []
    for c in cells:
        target = {**c["row"], **baseline}
        label = _label(target)
        b = index.get((tuple(target[k] for k in rows), _label(c["col"])))
        where = f"{_label(c['row'])} / {_label(c['col'])}"
        if b is None:
            c["diff"] = {"baseline": label, "missing": True}
            notes.append(f"paired differences: {where} has no baseline cell {label} in its column")
            continue
        if b is c:
            c["diff"] = {"baseline": label, "self": True}
            continue
        common = [s for s in c["by_seed"] if s in b["by_seed"]]
        values = [c["by_seed"][s] - b["by_seed"][s] for s in common]
        unpaired = [s for s in c["by_seed"] if s not in b["by_seed"]]
        baseline_only = [s for s in b["by_seed"] if s not in c["by_seed"]]
        mean, std = _stats(values) if values else (math.nan, math.nan)
        c["diff"] = {"baseline": label, "n": len(values), "mean": mean, "std": std, "values": values,
                     "seeds": common, "ci": _intervals(values), "unpaired": unpaired, "baseline_only": baseline_only}
        if unpaired or baseline_only:
            parts = ([f"seed{'s' * (len(unpaired) > 1)} {' '.join(unpaired)} without a baseline run"] if unpaired else []) + \
                    ([f"baseline seed{'s' * (len(baseline_only) > 1)} {' '.join(baseline_only)} without a run here"]
                     if baseline_only else [])
            notes.append(f"paired differences: {where} vs {label}: {'; '.join(parts)} (left out of the pairs)")
        for s_, k in sorted(c["seed_runs"].items()):
            if k > 1 and s_ in common:
                notes.append(f"paired differences: {where} has {k} runs of seed {s_}: their mean is paired")
    return notes


def _label(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "all runs"


def _ci_text(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"


def _cell_text(c: dict | None, ci: str = "t") -> str:
    if c is None:
        return "—"
    mark = "*" if c["partial"] else ""
    return f"{c['mean']:.4f} ± {c['std']:.4f}{_ci_text(c['ci'][ci])} (n={c['n']}){mark}"


def _diff_text(c: dict | None, ci: str = "t") -> str:
    d = None if c is None else c["diff"]
    if d is None or d.get("missing"):
        return "—"
    if d.get("self"):
        return "baseline"
    if d["n"] == 0:
        return "no pairs"
    return f"{d['mean']:+.4f}{_ci_text(d['ci'][ci])} ({d['n']} pair{'s' * (d['n'] != 1)})"


def diff_title(baseline: dict[str, str], ci: str) -> str:
    return (f"paired difference vs {_label(baseline)} (same column, same seed): mean over seeds, "
            f"95 % CI ({CI_KINDS[ci]})")


def table_grid(cells: list[dict]) -> tuple[list[str], list[str], dict]:
    row_labels = list(dict.fromkeys(_label(c["row"]) for c in cells))
    col_labels = list(dict.fromkeys(_label(c["col"]) for c in cells))
    grid = {(_label(c["row"]), _label(c["col"])): c for c in cells}
    return row_labels, col_labels, grid


def markdown(cells: list[dict], title: str, notes: list[str], ci: str = "t", diff: str | None = None) -> str:
    """The table (and, with ``diff`` = its title, the paired differences' table) and the notes."""
    row_labels, col_labels, grid = table_grid(cells)
    head = ["| method | " + " | ".join(col_labels) + " |", "|---|" + "---:|" * len(col_labels)]
    lines = [f"# {title}", "", *head]
    for r in row_labels:
        lines.append(f"| {r} | " + " | ".join(_cell_text(grid.get((r, c)), ci) for c in col_labels) + " |")
    if diff is not None:
        lines += ["", f"## {diff}", "", *head]
        for r in row_labels:
            lines.append(f"| {r} | " + " | ".join(_diff_text(grid.get((r, c)), ci) for c in col_labels) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def csv_text(cells: list[dict], rows: list[str], cols: list[str], metric: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*rows, *cols, "metric", "mean", "std", "n", "n_partial", "seeds", "runs", *CSV_CI_COLUMNS])
    num = lambda x: "" if x is None else repr(float(x))  # noqa: E731
    lohi = lambda ci: ["", ""] if ci is None else [num(ci[0]), num(ci[1])]  # noqa: E731
    for c in cells:
        d = c["diff"]
        if d is None:
            extra = [""] * 9
        elif d.get("missing") or d.get("self"):
            extra = [d["baseline"], "self" if d.get("self") else "missing"] + [""] * 7
        else:
            extra = [d["baseline"], str(d["n"]), num(d["mean"]) if d["n"] else "", *lohi(d["ci"]["t"]),
                     *lohi(d["ci"]["bootstrap"]), " ".join(d["unpaired"]), " ".join(d["baseline_only"])]
        w.writerow([*c["row"].values(), *c["col"].values(), metric, repr(c["mean"]), repr(c["std"]), c["n"],
                    c["partial"], " ".join(c["seeds"]), " ".join(str(r.path) for r in c["runs"]),
                    *lohi(c["ci"]["t"]), *lohi(c["ci"]["bootstrap"]), *extra])
    return buf.getvalue()


CSV_CI_COLUMNS = ("ci_t_lo", "ci_t_hi", "ci_boot_lo", "ci_boot_hi", "baseline", "diff_n", "diff_mean",
                  "diff_ci_t_lo", "diff_ci_t_hi", "diff_ci_boot_lo", "diff_ci_boot_hi", "diff_unpaired_seeds",
                  "diff_baseline_only_seeds")


def print_rich(cells: list[dict], title: str, notes: list[str], ci: str = "t", diff: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    row_labels, col_labels, grid = table_grid(cells)
    console = Console()
    for t, text in ((title, _cell_text), *(((diff, _diff_text),) if diff is not None else ())):
        table = Table(title=t)
        table.add_column("method")
        for c in col_labels:
            table.add_column(c, justify="right")
        for r in row_labels:
            table.add_row(r, *(text(grid.get((r, c)), ci) for c in col_labels))
        console.print(table)
    for n in notes:
        console.print(n)


def _errorbar_panel(ax, points: list[tuple[str, float, tuple[float, float] | None]], ylabel: str, title: str,
                    zero: bool = False) -> None:
    """One point per method with its interval as an error bar (a bare point without one)."""
    xs = list(range(len(points)))
    for x, (_, y, ci) in zip(xs, points):
        if ci is None:
            ax.plot([x], [y], "o", color="C0")
        else:
            ax.errorbar([x], [y], yerr=[[y - ci[0]], [ci[1] - y]], fmt="o", capsize=4, color="C0")
    if zero:
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, [p[0] for p in points], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel=ylabel, title=title)


def curves_png(cells: list[dict], metric: str, ci: str = "t", baseline: dict[str, str] | None = None) -> bytes:
    """Metric vs step per cell: mean over the seeds that reached each step, ±1 std band; below,
    each cell's final mean with its 95 % interval (``ci``) as error bars, and with ``baseline``
    the paired differences with theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col_labels = list(dict.fromkeys(_label(c["col"]) for c in cells))
    n_rows = 3 if baseline is not None else 2
    fig, axes = plt.subplots(n_rows, len(col_labels), figsize=(5.5 * len(col_labels), 4 * n_rows), squeeze=False)
    for k, col in enumerate(col_labels):
        in_col = [c for c in cells if _label(c["col"]) == col]
        _errorbar_panel(axes[1][k], [(_label(c["row"]), c["mean"], c["ci"][ci]) for c in in_col],
                        f"{metric} (mean over seeds)", f"{_fit(col)}: 95 % CI ({CI_KINDS[ci]})")
        if baseline is not None:
            pts = [(_label(c["row"]), c["diff"]["mean"], c["diff"]["ci"][ci]) for c in in_col
                   if c["diff"] is not None and "n" in c["diff"] and c["diff"]["n"] > 0]
            _errorbar_panel(axes[2][k], pts, f"Δ {metric} (paired by seed)", f"{_fit(col)}: vs {_label(baseline)}", zero=True)
    for ax, col in zip(axes[0], col_labels):
        for c in (c for c in cells if _label(c["col"]) == col):
            steps = sorted({s for r in c["runs"] for s in r.curve})
            pts = [(s, _stats([r.curve[s] for r in c["runs"] if s in r.curve])) for s in steps]
            if not pts:
                continue
            x = [s for s, _ in pts]
            mean = [m for _, (m, _) in pts]
            std = [sd for _, (_, sd) in pts]
            line, = ax.plot(x, mean, label=f"{_label(c['row'])} (n={c['n']}{', partial' if c['partial'] else ''})")
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel=f"{metric} (mean over tasks)", title=_fit(col))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # a run-level metric (e.g. unseen_return) has no curve over steps
            ax.text(0.5, 0.5, f"no per-step curve of {metric}", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def groups_points(runs: list[Run], metric: str) -> dict[str, dict[int, dict[str, list[float]]]]:
    """method -> number of groups -> {metric, "heldout", "rollout"} -> one value per finished run
    whose results.json has ``n_groups`` and ``gate`` (the g_harmodt recipe)."""
    points: dict[str, dict[int, dict[str, list[float]]]] = {}
    for r in (r for r in runs if r.complete):
        res = json.loads((r.path / "results.json").read_text())
        if "n_groups" not in res or "gate" not in res or not isinstance(res["n_groups"], int):
            continue
        at = points.setdefault(str(res.get("method", "?")), {}).setdefault(int(res["n_groups"]), {})
        value = res["mean"][metric]
        at.setdefault(metric, []).append(math.nan if value is None else float(value))
        gate = res["gate"] if isinstance(res["gate"], dict) else {}
        for kind in ("heldout", "rollout"):
            acc = gate.get(kind, {}).get("overall") if isinstance(gate.get(kind), dict) else None
            if acc is not None:
                at.setdefault(kind, []).append(float(acc))
    return points


def groups_png(runs: list[Run], metric: str) -> bytes | None:
    """Task-agnostic sweeps: the metric and the gate's accuracy (held-out episodes, evaluation
    episodes) vs the number of groups, one line per method, mean ± std over seeds (journal Fig. 3).
    ``None`` when no finished run is of that kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = groups_points(runs, metric)
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, by_n in sorted(points.items()):
        ns = sorted(by_n)
        for ax, key, style in ((axes[0], metric, "-o"), (axes[1], "heldout", "-o"), (axes[1], "rollout", "--s")):
            pts = [(n, _stats(by_n[n][key])) for n in ns if by_n[n].get(key)]
            if not pts:
                continue
            label = method if key == metric else f"{method} ({key})"
            ax.errorbar([n for n, _ in pts], [m for _, (m, _) in pts], yerr=[sd for _, (_, sd) in pts], fmt=style,
                        capsize=3, label=label)
    axes[0].set(xlabel="number of groups N^G", ylabel=f"{metric} (mean over tasks)", title=f"{metric} vs groups")
    axes[1].set(xlabel="number of groups N^G", ylabel="gate accuracy", title="gate accuracy vs groups", ylim=(0, 1.05))
    for ax in axes:
        ax.legend(fontsize=7)
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as PNG bytes (laid out, then closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- writing
def write_new(path: Path, data: bytes) -> None:
    """Atomically create ``path``; an existing file is never replaced (FileExistsError)."""
    atomic_write_bytes(path, data, replace=False)


def new_stem(out_dir: Path) -> Path:
    """``report_<UTC time>`` (``_2``, ``_3``… if taken) with none of its files existing yet."""
    base = "report_" + time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime())
    for i in range(1, 1000):
        stem = out_dir / (base if i == 1 else f"{base}_{i}")
        if not any(stem.with_suffix(s).exists() for s in (".md", ".csv", ".png")):
            return stem
    raise ReportError(f"{out_dir}: no free report name for {base}")


def factor_list(p: argparse.ArgumentParser, flag: str, value: str | None) -> list[str] | None:
    """``--rows``/``--cols``: comma-separated factor names, each once (a usage error otherwise)."""
    if value is None:
        return None
    keys = [x.strip() for x in value.split(",")]
    if not any(keys) or not all(keys):
        p.error(f"{flag} {value!r}: expected comma-separated factor names, e.g. {flag} scorer,variant")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        p.error(f"{flag} {value!r}: {', '.join(twice)} given twice")
    return keys


def baseline_pairs(p: argparse.ArgumentParser, value: str | None) -> dict[str, str] | None:
    """``--baseline KEY=VALUE[,KEY=VALUE…]`` -> {key: value} (a usage error otherwise)."""
    if value is None:
        return None
    out: dict[str, str] = {}
    for part in value.split(","):
        key, eq, val = (x.strip() for x in part.partition("="))
        if not eq or not key or not val:
            p.error(f"--baseline {value!r}: expected KEY=VALUE pairs separated by commas, e.g. --baseline method=harmodt_r")
        if key in out:
            p.error(f"--baseline {value!r}: {key} given twice")
        out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="multirun folder (hydra.sweep.dir)")
    p.add_argument("--rows", help="comma-separated factors forming the rows (method); default: varying method groups")
    p.add_argument("--cols", help="comma-separated factors forming the columns; default: the other varying factors")
    p.add_argument("--metric", help="per-task metric to report (default: the recipe's headline metric)")
    p.add_argument("--out", type=Path, help="folder for the report files (default: SWEEP/reports)")
    p.add_argument("--ci", choices=sorted(CI_KINDS), default="t",
                   help="95 %% interval shown: t (t-interval, default) or bootstrap (percentile, B=10,000); the CSV has both")
    p.add_argument("--baseline", metavar="KEY=VALUE",
                   help="paired differences (by seed, within a column) against the row with these values, "
                        "e.g. method=harmodt_r; comma-separated pairs for several row factors")
    try:  # usage errors: argparse's message, status 2
        args = p.parse_args(argv)
        rows_given, cols_given = factor_list(p, "--rows", args.rows), factor_list(p, "--cols", args.cols)
        both = sorted(set(rows_given or []) & set(cols_given or []))
        if both:
            p.error(f"--rows and --cols both name {', '.join(both)}: a factor is either rows or columns")
        baseline = baseline_pairs(p, args.baseline)
        if args.metric is not None and (not args.metric.strip() or "/" in args.metric):
            p.error(f"--metric {args.metric!r}: expected a per-task metric name, e.g. --metric accuracy")
    except SystemExit as e:
        return int(e.code or 0)
    warnings: list[str] = []
    shown = False  # the notes (warnings among them) printed under the table
    try:
        runs, metric, warnings = load_runs(args.sweep, args.metric)
        if not runs:
            raise ReportError(f"{args.sweep}: no run has a result or an evaluation yet"
                              + (f" ({len(warnings)} run folder{'s' * (len(warnings) > 1)} left out, see above)"
                                 if warnings else ""))
        rows, cols = default_keys(runs, rows_given, cols_given)
        out_dir = args.out or args.sweep / "reports"
        if out_dir.exists() and not out_dir.is_dir():
            raise ReportError(f"--out {out_dir} is a file, expected a folder for the report files")
        cells = aggregate(runs, rows, cols)
        pair_notes = pair_with_baseline(cells, rows, baseline) if baseline is not None else []
        n_partial = sum(not r.complete for r in runs)
        title = f"{metric}: mean ± std over seeds [95 % CI, {CI_KINDS[args.ci]}] (n runs) — {args.sweep}"
        dtitle = diff_title(baseline, args.ci) if baseline is not None else None
        notes = [f"{len(runs)} runs, {n_partial} partial (* = cell includes runs without results.json: last evaluation "
                 f"in metrics.jsonl)", *(f"warning: {w}" for w in warnings)]
        notes += [f"partial: {r.path} at step {r.step}" for r in runs if not r.complete]
        notes += ["95 % intervals of the mean over seeds: none with n < 2; the CSV has both the t-interval and the "
                  f"bootstrap percentile interval (B={BOOTSTRAP_B:,}, numpy default_rng({BOOTSTRAP_SEED}) per cell)"]
        notes += pair_notes
        print_rich(cells, title, notes, args.ci, dtitle)
        shown = True
        markdown_bytes = markdown(cells, title, notes, args.ci, dtitle).encode()
        csv_bytes = csv_text(cells, rows, cols, metric).encode()
        png_bytes = curves_png(cells, metric, args.ci, baseline)
        groups = groups_png(runs, metric)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = new_stem(out_dir)
        write_new(stem.with_suffix(".md"), markdown_bytes)
        write_new(stem.with_suffix(".csv"), csv_bytes)
        write_new(stem.with_suffix(".png"), png_bytes)
        if groups is not None:
            write_new(stem.with_name(stem.name + "_groups.png"), groups)
    except (ReportError, OSError) as e:  # OSError: FileExistsError (never overwritten), an unwritable --out
        for w in warnings if not shown else []:
            print(f"report: warning: {w}", file=sys.stderr)
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {stem}.md, {stem}.csv, {stem}.png" + (f", {stem}_groups.png" if groups is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
