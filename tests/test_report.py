"""tools/report.py: the table's numbers equal the runs' results.json, partial runs are marked, and
nothing is ever overwritten. Synthetic sweeps (fast) and a real local multirun (slow)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["a", "b", "c"]


import recipes.tools.report as report  # noqa: E402


def fake_run(d: Path, options: dict, seed: int, per_task_acc: list[float], curve: dict[int, list[float]],
             finished: bool = True) -> None:
    """A run folder as a recipe leaves it: results.json (if finished), metrics.jsonl, .hydra/*.yaml."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\ntasks: [{', '.join(TASKS)}]\n")
    choices = "\n".join(f"      {k}: {v}" for k, v in options.items())
    (d / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n" + choices + "\n      hydra/launcher: basic\n"
        f"  overrides:\n    task: [{', '.join(f'{k}={v}' for k, v in options.items())}, seed={seed}]\n")
    with open(d / "metrics.jsonl", "w") as f:
        for step, accs in sorted(curve.items()):
            f.write(json.dumps({"step": step, "train/loss": 1.0, **{f"eval/{t}/accuracy": a for t, a in zip(TASKS, accs)}}) + "\n")
    if finished:
        per_task = {t: {"accuracy": a, "loss": 1.0 - a} for t, a in zip(TASKS, per_task_acc)}
        mean = {"accuracy": sum(per_task_acc) / 3, "loss": 1.0 - sum(per_task_acc) / 3}
        (d / "results.json").write_text(json.dumps({
            "recipe": "toy", "options": {"recipe": "toy", **options}, "seed": seed, "tasks": TASKS,
            "per_task": per_task, "mean": mean, "headline": {"name": "accuracy", "value": mean["accuracy"]},
            "steps": 100, "wall_time_s": 1.0}))


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def only(pattern: str, folder: Path) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def sweep(tmp_path):
    """2 scorers × 2 variants × 3 seeds, finished; plus one partial run (no results.json)."""
    i = 0
    for scorer in ("fisher", "magnitude"):
        for variant in ("frozen", "learned"):
            for seed in range(3):
                accs = [0.1 * seed + 0.01 * k + (0.3 if scorer == "fisher" else 0) + (0.2 if variant == "learned" else 0)
                        for k in range(3)]
                fake_run(tmp_path / str(i), {"scorer": scorer, "variant": variant}, seed, accs,
                         {50: [x / 2 for x in accs], 100: accs})
                i += 1
    fake_run(tmp_path / str(i), {"scorer": "fisher", "variant": "learned"}, 3, [], {50: [0.9, 0.8, 0.7]}, finished=False)
    return tmp_path


def test_cells_equal_results_json_and_partial_is_marked(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    rows = read_csv(only("reports/report_*.csv", sweep))
    assert len(rows) == 4 and set(rows[0]) >= {"scorer", "variant", "mean", "std", "n", "n_partial"}
    for row in rows:
        results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
        values = [r["mean"]["accuracy"] for r in results
                  if r["options"]["scorer"] == row["scorer"] and r["options"]["variant"] == row["variant"]]
        if (row["scorer"], row["variant"]) == ("fisher", "learned"):
            values.append((0.9 + 0.8 + 0.7) / 3)  # the partial run's last evaluation
            assert row["n_partial"] == "1" and row["n"] == "4" and row["seeds"] == "0 1 2 3"
        else:
            assert row["n_partial"] == "0" and row["n"] == "3"
        assert float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
    md = only("reports/report_*.md", sweep).read_text()
    assert "| variant=learned, scorer=fisher | " in md and "| method | tasks=a+b+c |" in md
    assert md.count("(n=4)*") == 1 and md.count("(n=3) ") == 3 and "1 partial" in md and "at step 50" in md
    png = only("reports/report_*.png", sweep).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "0.6" in out and "partial" in out


def test_default_rows_are_methods_and_columns_the_other_varying_factors(sweep):
    runs, metric, _ = report.load_runs(sweep)
    assert metric == "accuracy" and sum(not r.complete for r in runs) == 1
    assert report.default_keys(runs, None, None) == (["variant", "scorer"], ["tasks"])
    assert report.default_keys(runs, ["scorer"], None) == (["scorer"], ["variant"])
    with pytest.raises(report.ReportError, match="--rows: 'optimizer' is not a factor"):
        report.default_keys(runs, ["optimizer"], None)


def test_explicit_rows_and_columns(sweep):
    assert report.main([str(sweep), "--rows", "scorer", "--cols", "variant"]) == 0
    rows = read_csv(only("reports/report_*.csv", sweep))
    assert [(r["scorer"], r["variant"]) for r in rows] == [("fisher", "frozen"), ("fisher", "learned"),
                                                            ("magnitude", "frozen"), ("magnitude", "learned")]
    md = only("reports/report_*.md", sweep).read_text()
    assert "| method | variant=frozen | variant=learned |" in md


def test_reports_are_never_overwritten(sweep):
    assert report.main([str(sweep)]) == 0
    first = {p: p.read_bytes() for p in (sweep / "reports").iterdir()}
    assert report.main([str(sweep)]) == 0  # same second: a new name, the first files untouched
    files = sorted((sweep / "reports").iterdir())
    assert len(files) == 6 and all(p.read_bytes() == b for p, b in first.items())
    target = sweep / "reports" / "x.md"
    target.write_text("mine")
    with pytest.raises(FileExistsError):
        report.write_new(target, b"theirs")
    assert target.read_text() == "mine" and not [p for p in (sweep / "reports").iterdir() if p.name.endswith(".tmp")]


def test_clear_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 1
    assert "holds no run folders" in capsys.readouterr().err
    fake_run(tmp_path / "0", {"scorer": "fisher"}, 0, [0.5, 0.5, 0.5], {100: [0.5, 0.5, 0.5]})
    assert report.main([str(tmp_path), "--metric", "f1"]) == 1
    assert "has no metric 'f1'" in capsys.readouterr().err


@pytest.mark.slow
def test_report_over_a_real_local_sweep_with_a_killed_run(tmp_path):
    """Four smoke runs through hydra/launcher=local (parallel processes) and one run killed at step 15
    (no results.json): the report's cells equal the results.json values plus the killed run's last eval."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(ROOT / "tools" / "run.py")]
    sweep = tmp_path / "sweep"
    killed = subprocess.Popen([*cmd, "recipe=digits", "debug=smoke", "scorer=fisher", "seed=2",
                               f"hydra.run.dir={sweep / 'killed'}"], cwd=ROOT, env={**env, "MASKMTL_KILL_AT_STEP": "15"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = subprocess.run([*cmd, "-m", "recipe=digits", "debug=smoke", "scorer=fisher,magnitude", "seed=0,1",
                            "hydra/launcher=local", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert killed.wait(timeout=120) != 0 and not (sweep / "killed" / "results.json").exists()
    finally:
        killed.kill()
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 4
    last_eval = [json.loads(line) for line in (sweep / "killed" / "metrics.jsonl").read_text().splitlines()
                 if "eval/mean_accuracy" in line][-1]
    assert last_eval["step"] == 10

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(sweep)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["scorer"]: row for row in read_csv(only("reports/report_*.csv", sweep))}
    assert set(rows) == {"fisher", "magnitude"}
    for scorer, row in rows.items():
        values = [x["mean"]["accuracy"] for x in results if x["options"]["scorer"] == scorer]
        if scorer == "fisher":
            values.append(last_eval["eval/mean_accuracy"])
        assert row["n"] == str(len(values)) and row["n_partial"] == str(int(scorer == "fisher"))
        assert float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-9)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
    assert "partial" in r.stdout and str(sweep / "killed") in r.stdout.replace("\n", "")


def test_partial_run_without_a_task_list_uses_every_logged_task(tmp_path):
    """Recipes that take their tasks from the data have none in the config: a running job's curve
    averages every eval/<task>/<metric> it logged."""
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 10, "train/loss": 0.5}) + "\n"
                   + json.dumps({"step": 20, "eval/a/success": 0.2, "eval/b/success": 0.6, "eval/mean_success": 0.4}) + "\n")
    assert report._curve(log, [], "success") == {20: pytest.approx(0.4)}
    assert report._curve(log, ["a"], "success") == {20: pytest.approx(0.2)}


def test_partial_run_without_a_task_list_shares_the_finished_runs_column(tmp_path):
    """A running Meta-World job has ``tasks: []`` in its config (the data names them): its task set is
    the tasks its log evaluated, so it lands in the column of the finished runs of the same tasks."""
    fake_run(tmp_path / "done", {"scorer": "fisher"}, 0, [0.5, 0.6, 0.7], {50: [0.5, 0.6, 0.7]})
    fake_run(tmp_path / "running", {"scorer": "fisher"}, 1, [], {50: [0.1, 0.2, 0.3]}, finished=False)
    (tmp_path / "running" / ".hydra" / "config.yaml").write_text("seed: 1\ntasks: []\n")
    runs, _, warnings = report.load_runs(tmp_path, "accuracy")
    assert not warnings and {r.factors["tasks"] for r in runs} == {"+".join(TASKS)}
    assert sorted(r.value for r in runs) == pytest.approx([0.2, 0.6])


def test_groups_a_method_sets_are_neither_rows_nor_columns(tmp_path):
    """method=harmodt_r fixes scheduler=frozen, method=harmodt_f scheduler=cosine: the scheduler is
    not a factor of its own, so every method shares one column and paired differences find pairs."""
    arms = {"harmodt_r": "frozen", "harmodt_f": "cosine", "harmodt_random": "cosine"}
    for i, (method, scheduler) in enumerate((m, s) for m, s in arms.items() for _ in range(2)):
        fake_run(tmp_path / str(i), {"method": method, "scheduler": scheduler}, i % 2, [0.5, 0.5, 0.5], {100: [0.5] * 3})
    runs, _, _ = report.load_runs(tmp_path)
    assert report.default_keys(runs, None, None) == (["method"], ["tasks"])
    # a factor that varies within a method stays a column
    fake_run(tmp_path / "6", {"method": "harmodt_f", "scheduler": "constant"}, 2, [0.5] * 3, {100: [0.5] * 3})
    runs, _, _ = report.load_runs(tmp_path)
    assert report.default_keys(runs, None, None) == (["method", "scheduler"], ["tasks"])


def test_a_metric_some_runs_lack_leaves_them_out_with_a_warning(tmp_path):
    """--metric unseen_return over a sweep where MTDT evaluated no unseen task: the runs that have it
    make the table, the others are named in a warning; a metric no run has stays an error."""
    for i, (method, extra) in enumerate((("prompt_dt", {"unseen_return": -100.0}), ("prompt_dt", {"unseen_return": -90.0}),
                                         ("mtdt", {}))):
        fake_run(tmp_path / str(i), {"method": method}, i, [0.5, 0.5, 0.5], {100: [0.5, 0.5, 0.5]})
        r = json.loads((tmp_path / str(i) / "results.json").read_text())
        r["mean"].update(extra)
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    assert report.main([str(tmp_path), "--metric", "unseen_return", "--out", str(tmp_path / "rep")]) == 0
    md = only("report_*.md", tmp_path / "rep").read_text().replace("\n", "")
    assert "2/results.json has no metric 'unseen_return'" in md and "left out" in md
    rows = read_csv(only("report_*.csv", tmp_path / "rep"))
    assert [(row["method"], row["n"], float(row["mean"])) for row in rows] == [("prompt_dt", "2", -95.0)]
    assert report.main([str(tmp_path), "--metric", "f1", "--out", str(tmp_path / "rep2")]) == 1
