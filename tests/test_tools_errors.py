"""Bad inputs to tools/export.py, tools/report.py, MetricsLog and read_metrics, table-driven.

Each case asserts the exit status (or the exception type), that the message names the option, key
or file and says what was expected (one line, no traceback), and that nothing was written: every
file under the test's folder is byte-for-byte what it was (a report over a sweep with one broken
run comes out, and then only the report's own files are new)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskmtl.outputs import MetricsError, MetricsLog, read_metrics
from test_report import fake_run, read_csv, report

ROOT = Path(__file__).resolve().parents[1]


def load_export_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


export_tool = load_export_tool()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes; folders as ``None``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def error_line(err: str, prog: str) -> str:
    """The one error line a tool printed (argparse's usage line may precede it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(f"{prog}: warning:")]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    return lines[-1]


# ================================================================================== tools/export.py
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished digits smoke run with unit masks (4 tasks, one group per task), ~10 s."""
    d = tmp_path_factory.mktemp("export") / "run"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "recipe=digits", "debug=smoke", "threads=1",
                        "masking.granularity=unit", f"hydra.run.dir={d}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return d


def edit_results(run: Path, change) -> None:
    r = json.loads((run / "results.json").read_text())
    change(r)
    (run / "results.json").write_text(json.dumps(r))


def set_config(key: str, value):
    def change(r):
        node = r["config"]
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    return lambda run: edit_results(run, change)


def write(name: str, data: bytes | str):
    def setup(run: Path):
        (run / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def remove(name: str):
    return lambda run: (run / name).unlink()


def checkpoint_without_model(run: Path) -> None:
    torch.save({"step": 20, "weights": {}}, run / "checkpoint.pt")


def make_file(rel: str, text: str = "mine"):
    def setup(run: Path):
        (run.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.parent / rel).write_text(text)
    return setup


# (id, options after RUN_DIR ({tmp}: the test's folder, {run}: the run folder), status, substrings of the error)
EXPORT_OPTION_CASES = [
    ("group-past-the-groups", ["group=7"], 2, ["group='7'", "expected an integer in [0, 3]", "4 groups"]),
    ("group-equal-to-count", ["group=4"], 2, ["group='4'", "[0, 3]"]),
    ("group-negative", ["group=-1"], 2, ["group='-1'", "integer >= 0"]),
    ("group-fraction", ["group=1.5"], 2, ["group='1.5'", "integer >= 0"]),
    ("group-word", ["group=first"], 2, ["group='first'", "integer >= 0"]),
    ("group-empty", ["group="], 2, ["group=''", "integer >= 0"]),
    ("voting-word", ["voting=abc"], 2, ["voting='abc'", "expected a number >= 0"]),
    ("voting-negative", ["voting=-1"], 2, ["voting='-1'", "expected a number >= 0"]),
    ("voting-nan", ["voting=nan"], 2, ["voting='nan'", "expected a number >= 0"]),
    ("voting-inf", ["voting=inf"], 2, ["voting='inf'", "expected a number >= 0"]),
    ("voting-all-tasks", ["voting=4"], 2, ["voting='4'", "count of tasks below 4", "keeps nothing"]),
    ("voting-past-the-tasks", ["voting=10"], 2, ["voting='10'", "the run has 4 tasks"]),
    ("atol-negative", ["group=1", "atol=-1"], 2, ["atol='-1'", "expected a number >= 0"]),
    ("atol-negative-alone", ["atol=-1"], 2, ["atol='-1'", "expected a number >= 0"]),
    ("atol-word", ["group=1", "atol=tight"], 2, ["atol='tight'", "expected a number >= 0"]),
    ("rtol-negative", ["group=1", "rtol=-0.5"], 2, ["rtol='-0.5'", "expected a number >= 0"]),
    ("rtol-inf", ["group=1", "rtol=inf"], 2, ["rtol='inf'", "expected a number >= 0"]),
    ("task-unknown", ["task=nine"], 2, ["task='nine'", "expected one of the run's tasks", "'digit'"]),
    ("task-empty", ["task="], 2, ["task=", "expected a task name"]),
    ("two-masks", ["task=digit", "group=1"], 2, ["exactly one of task=NAME, group=G, voting=THRESH",
                                                       "task=digit, group=1"]),
    ("no-mask", ["out={tmp}/x"], 2, ["exactly one of task=NAME", "got none"]),
    ("not-key-value", ["group"], 2, ["option 'group'", "expected key=value"]),
    ("unknown-key", ["group=1", "device=cuda"], 2, ["option 'device=cuda'", "unknown key 'device'",
                                                         "task, group, voting, out, atol, rtol"]),
    ("key-twice", ["group=1", "group=2"], 2, ["option group given twice", "group=1", "group=2"]),
    ("out-empty", ["group=1", "out="], 2, ["out=", "expected a folder"]),
    ("no-options", [], 2, ["the following arguments are required: options"]),
    ("unknown-flag", ["group=1", "--force"], 2, ["unrecognized arguments: --force"]),
]

# (id, setup of the run folder (None: no folder, "file": a file), options, status, substrings of the error)
EXPORT_RUN_CASES = [
    ("run-missing", None, ["group=1"], 1, ["{run}", "does not exist", "expected a finished run folder"]),
    ("run-is-a-file", "file", ["group=1"], 1, ["{run}", "is not a folder"]),
    ("no-results", remove("results.json"), ["group=1"], 1, ["results.json does not exist", "has not finished"]),
    ("results-not-json", write("results.json", "{\"recipe\": "), ["group=1"], 1,
     ["results.json is not valid JSON", "expected a run's results"]),
    ("results-a-list", write("results.json", "[1, 2]"), ["group=1"], 1, ["results.json", "'config'"]),
    ("results-without-config", lambda run: edit_results(run, lambda r: r.pop("config")), ["group=1"], 1,
     ["results.json", "expected a JSON object with the run's 'config'"]),
    ("results-without-entry", set_config("entry", None), ["group=1"], 1,
     ["results.json", "config.entry is None", "the recipe's run function"]),
    ("recipe-without-export", set_config("entry", "recipes.g_harmodt.train.run"), ["group=1"], 1,
     ["results.json", "recipes.g_harmodt.train has no export support", "export_setup"]),
    ("recipe-not-importable", set_config("entry", "recipes.nonexistent.train.run"), ["group=1"], 1,
     ["recipes.nonexistent.train", "cannot be imported"]),
    ("element-masks", set_config("masking.granularity", "element"), ["group=1"], 1,
     ["masking.granularity=element", "train with masking.granularity=unit or head"]),
    ("no-checkpoint", remove("checkpoint.pt"), ["group=1"], 1, ["checkpoint.pt does not exist"]),
    ("checkpoint-garbage", write("checkpoint.pt", b"not a checkpoint"), ["group=1"], 1,
     ["checkpoint.pt is not a readable checkpoint"]),
    ("checkpoint-without-model", checkpoint_without_model, ["group=1"], 1,
     ["checkpoint.pt", "state dict under 'model'"]),
    ("checkpoint-other-model", set_config("model.depth", 5), ["group=1"], 1,
     ["checkpoint.pt does not fit the model"]),
    ("no-masks", remove("masks.safetensors"), ["group=1"], 1, ["masks.safetensors does not exist"]),
    ("masks-garbage", write("masks.safetensors", b"\x00" * 64), ["group=1"], 1,
     ["masks.safetensors is not a readable safetensors file"]),
    ("out-is-a-file", make_file("taken.txt"), ["group=1", "out={tmp}/taken.txt"], 1,
     ["out={tmp}/taken.txt", "already exists (a file)", "nothing was overwritten"]),
    ("out-not-empty", make_file("taken/notes.txt"), ["group=1", "out={tmp}/taken"], 1,
     ["out={tmp}/taken", "already exists (a folder that is not empty)"]),
    ("out-under-a-file", make_file("taken.txt"), ["group=1", "out={tmp}/taken.txt/export"], 1,
     ["out={tmp}/taken.txt/export", "taken.txt is a file, expected a folder"]),
    ("default-out-taken", make_file("run/export/group-1/export.json", "{}"), ["group=1"], 1,
     ["out={run}/export/group-1", "already exists"]),
]


def _prepare_run(trained: Path, tmp_path: Path, setup) -> Path:
    run = tmp_path / "run"
    if setup == "file":
        run.write_text("not a run folder")
    elif setup is not None:
        shutil.copytree(trained, run)
        setup(run)
    return run


@pytest.mark.parametrize("options,status,needles",
                         [c[1:] for c in EXPORT_OPTION_CASES], ids=[c[0] for c in EXPORT_OPTION_CASES])
def test_export_bad_option(trained, tmp_path, capsys, options, status, needles):
    run = _prepare_run(trained, tmp_path, lambda run: None)
    check_export(run, tmp_path, capsys, options, status, needles)


@pytest.mark.parametrize("setup,options,status,needles",
                         [c[1:] for c in EXPORT_RUN_CASES], ids=[c[0] for c in EXPORT_RUN_CASES])
def test_export_bad_run_folder(trained, tmp_path, capsys, setup, options, status, needles):
    run = _prepare_run(trained, tmp_path, setup)
    check_export(run, tmp_path, capsys, options, status, needles)


def check_export(run: Path, tmp_path: Path, capsys, options, status, needles):
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{run}", str(run))  # noqa: E731
    before = snapshot(tmp_path)
    assert export_tool.main([str(run), *map(fill, options)]) == status
    captured = capsys.readouterr()
    line = error_line(captured.err, "export")
    for needle in map(fill, needles):
        assert needle in line, (needle, line)
    assert captured.out == ""
    assert snapshot(tmp_path) == before, "something was written"


def test_export_good_options_still_work_and_never_overwrite(trained, tmp_path, capsys):
    """The control: the same run folder exports (here group 1, then the same again: refused)."""
    run = _prepare_run(trained, tmp_path, lambda run: None)
    assert export_tool.main([str(run), "group=1", "atol=1e-4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["export"] == str(run / "export" / "group-1") and out["params_exported"] < out["params_full"]
    first = snapshot(tmp_path)
    assert export_tool.main([str(run), "group=1"]) == 1
    assert "already exists" in error_line(capsys.readouterr().err, "export")
    assert snapshot(tmp_path) == first


@pytest.mark.parametrize("options,needle", [(["group=7"], "group='7': expected an integer in [0, 3]"),
                                            (["voting=abc"], "voting='abc': expected a number >= 0"),
                                            (["group=1", "atol=-1"], "atol='-1': expected a number >= 0")])
def test_export_command_line(trained, tmp_path, options, needle):
    """The real command line: status 2, one error line on stderr, no traceback, nothing written."""
    run = _prepare_run(trained, tmp_path, lambda run: None)
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), str(run), *options], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert error_line(p.stderr, "export").startswith(f"export: error: {needle}")
    assert snapshot(tmp_path) == before


# ================================================================================== tools/report.py
def sweep_with(tmp_path: Path, broken_finished: bool = True) -> tuple[Path, Path]:
    """Two good finished runs (fisher and magnitude, seed 0) and a third run ``2`` (fisher, seed 1;
    finished unless ``broken_finished`` is False) for a case to break."""
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", {"scorer": "fisher"}, 0, [0.5, 0.6, 0.7], {50: [0.2, 0.3, 0.4], 100: [0.5, 0.6, 0.7]})
    fake_run(sweep / "1", {"scorer": "magnitude"}, 0, [0.1, 0.2, 0.3], {100: [0.1, 0.2, 0.3]})
    fake_run(sweep / "2", {"scorer": "fisher"}, 1, [0.9, 0.9, 0.9], {50: [0.8, 0.8, 0.8], 100: [0.9, 0.9, 0.9]},
             finished=broken_finished)
    return sweep, sweep / "2"


def results_edit(change):
    def setup(run: Path):
        r = json.loads((run / "results.json").read_text())
        change(r)
        (run / "results.json").write_text(json.dumps(r))
    return setup


def pop(*keys):
    return results_edit(lambda r: [r.pop(k) for k in keys])


def put(key, value):
    return results_edit(lambda r: r.__setitem__(key, value))


def put_mean(value):
    return results_edit(lambda r: r["mean"].__setitem__("accuracy", value))


def garbage_log_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")


# (id, finished?, setup of run 2, fisher cell's n (2: kept, 1: left out), substrings of the warning)
REPORT_SKIP_CASES = [
    ("results-not-json", True, write("results.json", "{\"recipe\": \"toy\", "), 1,
     ["2/results.json is not valid JSON", "line 1", "left out"]),
    ("results-empty", True, write("results.json", ""), 1, ["2/results.json is not valid JSON"]),
    ("results-a-list", True, write("results.json", "[1, 2, 3]"), 1,
     ["2/results.json: expected a JSON object", "got list"]),
    ("results-without-mean", True, pop("mean"), 1, ["2/results.json: missing key 'mean'", "an object metric -> value"]),
    ("results-without-seed-and-steps", True, pop("seed", "steps"), 1, ["missing keys 'seed', 'steps'"]),
    ("results-seed-a-word", True, put("seed", "one"), 1, ["2/results.json: 'seed' is \"one\", expected an integer"]),
    ("results-tasks-a-string", True, put("tasks", "a+b+c"), 1, ["'tasks' is \"a+b+c\", expected a list of task names"]),
    ("results-headline-a-string", True, put("headline", "accuracy"), 1,
     ["'headline' is \"accuracy\", expected an object"]),
    ("results-options-a-list", True, put("options", ["scorer=fisher"]), 1,
     ["'options' is [\"scorer=fisher\"], expected an object"]),
    ("results-metric-a-word", True, put_mean("high"), 1,
     ["2/results.json: mean accuracy is \"high\", expected a number"]),
    ("hydra-yaml-unparsable", True, write(".hydra/hydra.yaml", "hydra:\n  runtime: [choices\n"), 1,
     ["2/.hydra/hydra.yaml is not readable YAML", "left out"]),
    ("hydra-yaml-wrong-shape", True, write(".hydra/hydra.yaml", "hydra:\n  overrides: {}\n"), 1,
     ["2/.hydra/hydra.yaml: expected hydra.runtime.choices"]),
    ("hydra-yaml-a-list", True, write(".hydra/hydra.yaml", "- 1\n- 2\n"), 1,
     ["2/.hydra/hydra.yaml: expected a YAML mapping"]),
    ("config-yaml-unparsable", False, write(".hydra/config.yaml", "seed: [1\n"), 1,
     ["2/.hydra/config.yaml is not readable YAML"]),
    ("config-yaml-tasks-a-number", False, write(".hydra/config.yaml", "seed: 1\ntasks: 3\n"), 1,
     ["2/.hydra/config.yaml: tasks is 3, expected a list of task names"]),
    ("partial-without-seed-and-tasks", False, write(".hydra/config.yaml", "model: {}\n"), 1,
     ["2: neither results.json nor .hydra/config.yaml says its seed and tasks"]),
    ("partial-log-garbage-middle-line", False, garbage_log_line, 1,
     ["2/metrics.jsonl:2: not a JSON line", "a partial run: its log is all it has"]),
    ("partial-nothing-evaluated", False, write("metrics.jsonl", "{\"step\": 5, \"train/loss\": 1.0}\n"), 1,
     ["no results.json and no evaluation of accuracy logged yet"]),
    ("finished-log-garbage-middle-line", True, garbage_log_line, 2,
     ["2/metrics.jsonl:2: not a JSON line", "curve left out (its table value is from results.json)"]),
    ("finished-log-step-missing", True, write("metrics.jsonl", "{\"train/loss\": 1.0}\n{\"step\": 9}\n"), 2,
     ["2/metrics.jsonl:1: expected a JSON object with an integer \"step\""]),
    ("finished-metric-null", True, put_mean(None), 2, ["mean accuracy is null (NaN or inf", "counted as NaN"]),
]


@pytest.mark.parametrize("finished,setup,n,needles", [c[1:] for c in REPORT_SKIP_CASES],
                         ids=[c[0] for c in REPORT_SKIP_CASES])
def test_report_over_a_sweep_with_one_broken_run(tmp_path, capsys, finished, setup, n, needles):
    sweep, broken = sweep_with(tmp_path, finished)
    setup(broken)
    before = snapshot(tmp_path)
    assert report.main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    after = snapshot(tmp_path)
    new = sorted(set(after) - set(before))
    assert [Path(p).suffix for p in new] == ["", ".csv", ".md", ".png"] and new[0] == "sweep/reports"
    assert {k: after[k] for k in before} == before, "a run's file was changed"
    rows = {row["scorer"]: row for row in read_csv(tmp_path / next(p for p in new if p.endswith(".csv")))}
    assert rows["fisher"]["n"] == str(n) and rows["magnitude"]["n"] == "1"
    md = (tmp_path / next(p for p in new if p.endswith(".md"))).read_text()
    notes = [line for line in md.splitlines() if line.startswith("- warning: ")]
    assert len(notes) == 1, md
    printed = "".join(captured.out.split())  # the notes under the printed table too (rich wraps them)
    for needle in needles:
        assert needle in notes[0] and "".join(needle.split()) in printed, (needle, notes[0])
    assert str(broken) in notes[0]


def test_report_skips_a_truncated_last_log_line_silently(tmp_path, capsys):
    """A job still writing (or killed mid-line) leaves a truncated last line: no warning, the run's
    last complete evaluation counts."""
    sweep, partial = sweep_with(tmp_path, broken_finished=False)
    with open(partial / "metrics.jsonl", "a") as f:
        f.write('{"step": 150, "eval/a/accur')
    assert report.main([str(sweep)]) == 0
    rows = {row["scorer"]: row for row in read_csv(next((sweep / "reports").glob("*.csv")))}
    assert rows["fisher"]["n"] == "2" and rows["fisher"]["n_partial"] == "1"
    assert float(rows["fisher"]["mean"]) == pytest.approx((0.6 + 0.9) / 2)
    assert "warning" not in capsys.readouterr().out


def broken_only(tmp_path: Path) -> Path:
    sweep, broken = sweep_with(tmp_path)
    shutil.rmtree(sweep / "0")
    shutil.rmtree(sweep / "1")
    (broken / "results.json").write_text("garbage")
    return sweep


def sweep_file(tmp_path: Path) -> Path:
    (tmp_path / "sweep").write_text("not a folder")
    return tmp_path / "sweep"


def partial_only(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", {"scorer": "fisher"}, 0, [], {50: [0.5, 0.5, 0.5]}, finished=False)
    return sweep


def out_is_a_file(tmp_path: Path) -> Path:
    sweep, _ = sweep_with(tmp_path)
    (tmp_path / "out").write_text("mine")
    return sweep


def good(tmp_path: Path) -> Path:
    return sweep_with(tmp_path)[0]


# (id, sweep builder, extra arguments ({tmp}), status, substrings of the error line)
REPORT_FAIL_CASES = [
    ("sweep-missing", lambda t: t / "nothing-here", [], 1,
     ["nothing-here is not a folder", "expected a multirun folder"]),
    ("sweep-a-file", sweep_file, [], 1, ["sweep is not a folder"]),
    ("sweep-empty", lambda t: (t / "sweep").mkdir() or t / "sweep", [], 1,
     ["sweep holds no run folders", "no results.json, metrics.jsonl or .hydra/config.yaml"]),
    ("sweep-of-broken-runs", broken_only, [], 1,
     ["sweep: no run has a result or an evaluation yet", "1 run folder left out"]),
    ("rows-not-a-factor", good, ["--rows", "optimizer"], 1, ["--rows: 'optimizer' is not a factor", "'scorer'"]),
    ("cols-not-a-factor", good, ["--cols", "scorer,width"], 1, ["--cols: 'width' is not a factor"]),
    ("rows-empty", good, ["--rows", ""], 2, ["--rows ''", "expected comma-separated factor names"]),
    ("rows-empty-item", good, ["--rows", "scorer,,tasks"], 2, ["--rows 'scorer,,tasks'", "comma-separated"]),
    ("rows-twice", good, ["--rows", "scorer,scorer"], 2, ["--rows 'scorer,scorer'", "scorer given twice"]),
    ("rows-and-cols-overlap", good, ["--rows", "scorer", "--cols", "tasks,scorer"], 2,
     ["--rows and --cols both name scorer"]),
    ("metric-not-in-results", good, ["--metric", "f1"], 1,
     ["--metric:", "0/results.json has no metric 'f1'", "'accuracy'"]),
    ("metric-not-logged", partial_only, ["--metric", "f1"], 1,
     ["--metric:", "0/metrics.jsonl logs no metric 'f1'", "['accuracy']"]),
    ("metric-empty", good, ["--metric", ""], 2, ["--metric ''", "expected a per-task metric name"]),
    ("metric-a-log-key", good, ["--metric", "eval/a/accuracy"], 2, ["--metric 'eval/a/accuracy'"]),
    ("out-a-file", out_is_a_file, ["--out", "{tmp}/out"], 1, ["--out {tmp}/out is a file, expected a folder"]),
    ("unknown-flag", good, ["--overwrite"], 2, ["unrecognized arguments: --overwrite"]),
    ("rows-without-value", good, ["--rows"], 2, ["argument --rows: expected one argument"]),
]


@pytest.mark.parametrize("build,extra,status,needles", [c[1:] for c in REPORT_FAIL_CASES],
                         ids=[c[0] for c in REPORT_FAIL_CASES])
def test_report_refuses(tmp_path, capsys, build, extra, status, needles):
    sweep = build(tmp_path)
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    before = snapshot(tmp_path)
    assert report.main([str(sweep), *map(fill, extra)]) == status
    captured = capsys.readouterr()
    line = error_line(captured.err, "report")
    for needle in map(fill, needles):
        assert needle in line, (needle, line)
    assert snapshot(tmp_path) == before, "something was written"


def test_report_of_broken_runs_only_lists_them_on_stderr(tmp_path, capsys):
    sweep = broken_only(tmp_path)
    assert report.main([str(sweep)]) == 1
    err = capsys.readouterr().err
    assert f"report: warning: {sweep / '2' / 'results.json'} is not valid JSON" in err


def test_report_command_line(tmp_path):
    """The real command line: one error line, no traceback, nothing written."""
    sweep, _ = sweep_with(tmp_path)
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(sweep), "--rows", "optimizer"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--rows: 'optimizer' is not a factor" in error_line(p.stderr, "report")
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(sweep), "--rows", ","],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--rows ','" in error_line(p.stderr, "report")
    assert snapshot(tmp_path) == before


# ================================================================================== MetricsLog, read_metrics
ROW = lambda step: json.dumps({"step": step, "train/loss": 0.5}) + "\n"  # noqa: E731

# (id, metrics.jsonl text, call, exception, substrings of the message ({path}: the file))
METRICS_CASES = [
    ("read-garbage-middle-line", ROW(1) + "{garbage\n" + ROW(3), "read", MetricsError,
     ["{path}:2: not a JSON line", "expected one JSON object per line"]),
    ("read-list-line", ROW(1) + "[1, 2]\n" + ROW(3), "read", MetricsError,
     ["{path}:2: expected a JSON object with an integer \"step\" >= 0", "'[1, 2]'"]),
    ("read-step-missing", "{\"train/loss\": 1}\n" + ROW(2), "read", MetricsError, ["{path}:1:", "integer \"step\""]),
    ("read-step-a-string", ROW(1) + "{\"step\": \"2\"}\n", "read", MetricsError, ["{path}:2:", "integer \"step\""]),
    ("read-step-negative", "{\"step\": -1}\n" + ROW(1), "read", MetricsError, ["{path}:1:", ">= 0"]),
    ("read-step-a-bool", "{\"step\": true}\n" + ROW(1), "read", MetricsError, ["{path}:1:", "integer \"step\""]),
    ("read-garbage-after-blank-lines", ROW(1) + "\n\nnope\n\n" + ROW(2), "read", MetricsError, ["{path}:4:"]),
    ("read-binary-middle-line", ROW(1) + "\udcff\udcfe\n" + ROW(2), "read", MetricsError,
     ["{path}:2: not a JSON line"]),
    ("read-json-last-line-not-a-row", ROW(1) + "[3]", "read", MetricsError, ["{path}:2:", "integer \"step\""]),
    ("resume-garbage-middle-line", ROW(1) + "{garbage\n" + ROW(3), "resume", MetricsError,
     ["{path}:2: not a JSON line"]),
    ("resume-step-missing", ROW(1) + "{\"loss\": 2}\n" + ROW(3), "resume", MetricsError, ["{path}:2:", "\"step\""]),
    ("resume-step-negative", ROW(1), lambda p: MetricsLog(p, resume_step=-1), ValueError,
     ["resume_step=-1", "expected None (append) or an integer >= 0"]),
    ("resume-step-a-string", ROW(1), lambda p: MetricsLog(p, resume_step="3"), ValueError, ["resume_step='3'"]),
    ("resume-step-a-float", ROW(1), lambda p: MetricsLog(p, resume_step=2.0), ValueError, ["resume_step=2.0"]),
    ("resume-step-a-bool", ROW(1), lambda p: MetricsLog(p, resume_step=True), ValueError, ["resume_step=True"]),
]


@pytest.mark.parametrize("text,call,exc,needles", [c[1:] for c in METRICS_CASES], ids=[c[0] for c in METRICS_CASES])
def test_metrics_bad_lines(tmp_path, text, call, exc, needles):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    before = snapshot(tmp_path)
    fn = {"read": read_metrics, "resume": lambda p: MetricsLog(p, resume_step=2)}.get(call, call)
    with pytest.raises(exc) as e:
        fn(path)
    for needle in needles:
        assert needle.replace("{path}", str(path)) in str(e.value), (needle, str(e.value))
    assert snapshot(tmp_path) == before, "the log was changed"


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(ROW(1) + ROW(2) + '{"step": 3, "train/lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text(ROW(1) + "\n\n" + '{"step": 3, "train/lo\n\n')  # blank lines after it: still the last line
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_resume_drops_the_truncated_last_line_and_the_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(ROW(1) + ROW(2) + ROW(3) + '{"step": 4, "train/lo')
    log = MetricsLog(path, resume_step=2)
    log.log(3, {"train/loss": 0.25})
    log.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 0.5), (2, 0.5), (3, 0.25)]


def test_resume_step_of_any_integer_type(tmp_path):
    import numpy as np

    path = tmp_path / "metrics.jsonl"
    path.write_text(ROW(1) + ROW(2) + ROW(3))
    MetricsLog(path, resume_step=np.int64(2)).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_fresh_start_drops_a_killed_attempts_lines(tmp_path):
    """A run killed before its first checkpoint left lines (one of them garbage); the rerun starts
    fresh (resume_step=0) and the log holds only its own lines, no duplicates."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(ROW(1) + "{garbage\n" + ROW(3) + '{"step": 4')
    log = MetricsLog(path, resume_step=0)
    for step in (1, 2):
        log.log(step, {"train/loss": 0.1})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_append_only_log_keeps_every_line(tmp_path):
    """resume_step=None (the final evaluation's second log) appends; a last line left without its
    newline is ended (complete) or cut (truncated) so the next row starts a line of its own."""
    path = tmp_path / "metrics.jsonl"
    for tail, kept in (('{"step": 3, "train/loss": 0.5}', [1, 2, 3]), ('{"step": 3, "tr', [1, 2])):
        path.write_text(ROW(1) + ROW(2) + tail)
        log = MetricsLog(path)
        log.log(9, {"eval/mean_accuracy": 0.5})
        log.close()
        assert [r["step"] for r in read_metrics(path)] == [*kept, 9]
    path.write_text(ROW(1) + "{garbage\n" + ROW(3))  # appending never needs the earlier lines
    log = MetricsLog(path)
    log.log(9, {})
    log.close()
    assert path.read_text().endswith(ROW(3) + '{"step": 9}\n')


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """digits killed at step 7 with no checkpoint written; the same command again starts fresh and
    its metrics.jsonl equals an uninterrupted run's (no line of the killed attempt left)."""
    from test_recipes import run

    common = ["recipe=digits", "debug=smoke", "threads=1", "train.checkpoint_every=0", "train.log_every=1"]
    run(*common, f"hydra.run.dir={tmp_path / 'a'}")
    killed = run(*common, f"hydra.run.dir={tmp_path / 'b'}", env={"MASKMTL_KILL_AT_STEP": "7"}, check=False)
    assert killed.returncode != 0 and not (tmp_path / "b" / "checkpoint.pt").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 8))
    run(*common, f"hydra.run.dir={tmp_path / 'b'}")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    a, b = (strip(read_metrics(tmp_path / x / "metrics.jsonl")) for x in "ab")
    assert [r["step"] for r in b] == list(range(1, 21)) and a == b
