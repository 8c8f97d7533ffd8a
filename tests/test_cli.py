"""The ``maskmtl`` command (recipes/cli.py): each command reaches its tool with the arguments
unchanged, unknown commands are refused with status 2, the console script named in
pyproject.toml is the one tested, the packages it lists ship the config, and Hydra's shell
completion works for ``maskmtl run``."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import cli
from recipes.tools import bench as bench_tool
from recipes.tools import config_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def entry_point():
    """The function ``[project.scripts] maskmtl`` names, as the installed script imports it."""
    module, func = pyproject()["project"]["scripts"]["maskmtl"].split(":")
    return getattr(importlib.import_module(module), func)


def script(tmp_path: Path) -> Path:
    """An executable ``maskmtl`` like the one pip writes for ``[project.scripts]``, in its own folder."""
    module, func = pyproject()["project"]["scripts"]["maskmtl"].split(":")
    path = tmp_path / "bin" / "maskmtl"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    path.chmod(0o755)
    return path


def maskmtl(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The console script's entry point in a fresh process (as ``maskmtl ARGS``), outside the checkout."""
    spec = pyproject()["project"]["scripts"]["maskmtl"]
    code = (f"import importlib, sys; sys.argv[0] = 'maskmtl'; m, f = {spec!r}.split(':'); "
            f"sys.exit(getattr(importlib.import_module(m), f)())")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------- dispatch

def test_entry_point_is_the_cli_and_help_lists_the_commands(capsys):
    main = entry_point()
    assert main is cli.main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "report", "export", "bench"):
        assert f"\n  {name} " in out, out
    assert "maskmtl run -sc install=bash" in out


@pytest.mark.parametrize("argv,message", [
    (["runn"], "unknown command 'runn': expected one of run, report, export, bench; did you mean run?"),
    (["frobnicate", "x=1"], "unknown command 'frobnicate': expected one of run, report, export, bench"),
    (["--cfg", "job"], "unknown command '--cfg'"),
    ([], "expected a command: run, report, export, bench"),
])
def test_bad_command_is_status_2_with_one_error_line(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("usage: maskmtl") and lines[-1].startswith("maskmtl: error: ") and len(lines) == 2
    assert message in lines[-1], captured.err


def test_run_passes_hydra_arguments_through(capsys):
    assert cli.main(["run", "recipe=digits", "seed=3", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "recipe_name: digits" in out and "seed: 3" in out and "entry: recipes.digits.train.run" in out
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "powered by Hydra" in out and "recipe: digits, g_harmodt, harmodt, make_data" in out


def test_run_reports_hydra_errors_with_its_status(capsys):
    assert cli.main(["run", "recipe=nope", "--cfg", "job"]) == 1  # Hydra's own error: status 1, as tools/run.py
    assert "recipe" in capsys.readouterr().err


def test_export_and_bench_reach_their_tools(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing"), "task=a"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("maskmtl export: error: ") and "does not exist" in err, err
    assert cli.main(["export", str(tmp_path), "colour=red"]) == 2
    assert "maskmtl export: error: option 'colour=red': unknown key 'colour'" in capsys.readouterr().err
    assert cli.main(["export"]) == 2  # argparse: the run folder and an option are required
    assert cli.main(["bench", "--help"]) == 0
    assert "masked-step" in capsys.readouterr().out
    assert cli.main(["bench", "no-such-benchmark"]) == 2
    assert "maskmtl bench: error: argument name: invalid choice" in capsys.readouterr().err


def test_bench_without_a_checkout_says_where_benchmarks_run(monkeypatch, tmp_path, capsys):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}", name="benchmarks")

    monkeypatch.setattr(bench_tool, "ROOT", tmp_path)
    monkeypatch.setattr(bench_tool.importlib, "import_module", missing)
    assert cli.main(["bench", "sampler"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("maskmtl bench: error: the benchmarks run from a checkout") and "\n" not in err.strip()


def test_report_is_the_packaged_report():
    """maskmtl report runs recipes.tools.report (installed with the package; tools/report.py calls it too)."""
    assert cli.main(["report", str(Path("no-such-sweep"))]) == 1
    assert cli.main(["report", "--rows"]) == 2  # argparse, in report's own parser
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), "no-such-sweep"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("report: error: "), p.stderr


def test_cli_does_not_import_the_recipes():
    """The command starts light: no recipe (torch models, Meta-World) and no Hydra until a command needs them."""
    p = subprocess.run([sys.executable, "-c", "import sys, recipes.cli; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('recipes', 'hydra')))"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "['recipes', 'recipes.cli', 'recipes.tools']", p.stdout + p.stderr


# ------------------------------------------------------------------------------------- packaging

def test_listed_packages_are_the_tree_and_ship_the_config():
    from setuptools import find_namespace_packages

    tool = pyproject()["tool"]["setuptools"]
    found = set(find_namespace_packages(where=str(ROOT), include=["maskmtl*", "recipes*", "hydra_plugins*"]))
    assert set(tool["packages"]) == found | {"recipes.conf"}
    assert (ROOT / tool["package-dir"]["recipes.conf"]) == config_dir()
    assert (config_dir() / "config.yaml").is_file()


def test_config_dir_prefers_the_installed_copy(monkeypatch, tmp_path):
    import recipes.tools as tools

    monkeypatch.setattr(tools, "PACKAGE", tmp_path / "site" / "recipes")
    monkeypatch.setattr(tools, "ROOT", tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        tools.config_dir()
    (tmp_path / "site" / "conf").mkdir(parents=True)
    (tmp_path / "site" / "conf" / "config.yaml").write_text("{}")
    assert tools.config_dir() == tmp_path / "site" / "conf"  # a checkout's
    (tmp_path / "site" / "recipes" / "conf").mkdir(parents=True)
    (tmp_path / "site" / "recipes" / "conf" / "config.yaml").write_text("{}")
    assert tools.config_dir() == tmp_path / "site" / "recipes" / "conf"  # an installed wheel's


# ------------------------------------------------------------------------------- shell completion

def complete(monkeypatch, capsys, line: str, shell: str = "bash") -> str:
    monkeypatch.setenv("COMP_LINE", line)
    assert cli.main(["-sc", f"query={shell}"]) == 0
    return capsys.readouterr().out


def test_completion_queries(monkeypatch, capsys):
    assert complete(monkeypatch, capsys, "maskmtl ").split() == ["run", "report", "export", "bench"]
    assert complete(monkeypatch, capsys, "maskmtl re").split() == ["report"]
    assert complete(monkeypatch, capsys, "maskmtl e", "fish") == "export\n"
    assert "scorer=" in complete(monkeypatch, capsys, "maskmtl run recipe=digits sco").split()
    assert "recipe=digits" in complete(monkeypatch, capsys, "maskmtl run recipe=di").split()
    assert os.environ["COMP_LINE"] == "maskmtl run recipe=di"  # Hydra saw it without "run"; restored
    assert complete(monkeypatch, capsys, "maskmtl export ").strip() == ""  # file names: bash's default


def test_completion_install_registers_the_program(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/some/bin/maskmtl", "run", "-sc", "install=bash"])
    assert cli.main() == 0
    out = capsys.readouterr().out
    assert "hydra_bash_completion()" in out and out.rstrip().endswith("-F hydra_bash_completion maskmtl")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_maskmtl_run(tmp_path):
    """Hydra's bash script, installed with ``eval "$(maskmtl run -sc install=bash)"``, completes a
    ``maskmtl run`` line typed in bash (two fresh processes of the console script)."""
    exe = script(tmp_path)
    line = "maskmtl run recipe=digits sco"
    words = line.split()
    cmd = (f'eval "$(maskmtl run -sc install=bash)" && COMP_LINE="{line}" COMP_POINT={len(line)} '
           f'COMP_WORDS=({line}) COMP_CWORD={len(words) - 1} && hydra_bash_completion && '
           f'printf "%s\\n" "${{COMPREPLY[@]}}"')
    p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**ENV, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "scorer=" in p.stdout.split() and all(w.startswith("scorer") for w in p.stdout.split()), p.stdout


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_maskmtl_run_then_report(tmp_path, capsys):
    """``maskmtl run recipe=digits debug=smoke`` outside the checkout writes a finished run;
    ``maskmtl report`` over its folder reads it."""
    d = tmp_path / "sweep" / "run"
    p = maskmtl("run", "recipe=digits", "debug=smoke", "threads=1", f"hydra.run.dir={d}", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((d / "results.json").read_text())
    assert r["recipe"] == "digits" and r["config"]["smoke"] is True
    assert cli.main(["report", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "1 runs, 0 partial" in out and list((tmp_path / "sweep" / "reports").glob("report_*.md"))


@pytest.mark.slow
def test_maskmtl_run_multirun_passes_through(tmp_path):
    p = maskmtl("run", "-m", "recipe=digits", "debug=smoke", "threads=1", "dry_run=true", "seed=0,1",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "#0 : recipe=digits debug=smoke threads=1 dry_run=True seed=0" in p.stdout + p.stderr
    assert "#1 : recipe=digits debug=smoke threads=1 dry_run=True seed=1" in p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("maskmtl") is None, reason="no maskmtl console script on PATH (pip install .)")
def test_installed_console_script(tmp_path):
    p = subprocess.run(["maskmtl", "nope"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "maskmtl: error: unknown command 'nope'" in p.stderr


def test_relative_data_root_is_the_checkouts_or_the_current_directory(monkeypatch, tmp_path):
    """A relative data_root: under the checkout when maskmtl runs from one, under the current
    directory from an installed wheel (never inside site-packages); absolute paths stay."""
    from recipes.metaworld import make_data

    monkeypatch.chdir(tmp_path)
    assert not make_data.installed()  # this test runs from a checkout
    assert make_data.data_root("data") == make_data.REPO_ROOT / "data"
    monkeypatch.setattr(make_data, "installed", lambda: True)
    assert make_data.data_root("data") == tmp_path / "data"
    assert make_data.data_root(tmp_path / "x") == tmp_path / "x"
