"""What a run says while it runs (recipes.common.phase and friends), the ``threads`` option, and
``curves.png``. Nothing here depends on timing: the time-based lines are tested with the interval
set to 0 (a line at every advance) or to infinity (none)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import recipes.common as common
from maskmtl.config import ConfigError
from recipes.common import evaluation, phase, plot_curves, resolve_threads, training_progress


@pytest.fixture
def no_timed_lines(monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", math.inf)


# ------------------------------------------------------------------------- progress off a terminal

def test_phase_prints_start_every_tenth_and_end(capsys, no_timed_lines):
    with phase("data: near_optimal, 2 tasks", 20, unit="episodes", detail="50 steps each") as p:
        for _ in range(20):
            p.advance(info="x")
        p.result = "all there"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "data: near_optimal, 2 tasks: started (20 episodes, 50 steps each)"
    counts = [re.search(r": (\d+)/20 episodes", line).group(1) for line in lines[1:-1]]
    assert counts == [str(k) for k in range(2, 21, 2)]
    assert "episodes/s" in lines[1] and "ETA" in lines[1] and "ETA" not in lines[-2]  # none when finished
    assert re.fullmatch(r"data: near_optimal, 2 tasks: done in [\d.]+ s, all there", lines[-1])


def test_time_based_lines_between_the_tenths(capsys, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_INTERVAL_S", 0.0)  # "at least every 0 s": a line per advance
    with training_progress(100) as p:
        for _ in range(15):
            p.advance(loss=0.5)
    out = capsys.readouterr().out
    assert len(re.findall(r"^train: \d+/100 steps", out, re.M)) == 15
    assert "loss 0.5000" in out and "steps/s" in out and "ETA" in out


def test_nested_phases_and_mask_updates(capsys, no_timed_lines):
    with training_progress(10, start=4) as train:
        train.advance(loss=1.0)
        train.mask_update(5, {"mask/swapped": 40.0, "mask/revived": 3.0, "mask/harmony": 0.25,
                              "mask/density_mean": 0.8, "time/mask_update_s": 0.5})
        with evaluation("evaluation at step 5", 2, {"episodes": 3, "parallel": 3, "max_steps": 40}) as ev:
            with phase("episodes 1-3 of 2 tasks", 40, fraction=None, announce="long") as grid:
                for _ in range(40):
                    grid.advance(info="6/6 envs playing")
            ev.result = "mean success 0.500"
        for _ in range(5):
            train.advance(loss=0.5)
    out = capsys.readouterr().out
    assert "train: started (6 steps from 4)" in out
    assert "mask update at step 5: 40 swapped, 3 revived, harmony 0.25, density 0.800, 0.5 s" in out
    assert "  evaluation at step 5: started (2 tasks x 3 episodes, 3 at a time per task, up to 40 steps each)" in out
    assert re.search(r"^  evaluation at step 5: done in [\d.]+ s, mean success 0.500$", out, re.M)
    assert "episodes 1-3" not in out  # a short inner phase stays quiet off a terminal
    assert re.search(r"^train: done in .*6 steps at [\d.]+ steps/s.*last loss 0.5000$", out, re.M)


def test_a_phase_left_by_an_exception_says_where_it_stopped(capsys, no_timed_lines):
    with pytest.raises(KeyboardInterrupt):
        with training_progress(10) as train:
            for _ in range(3):
                train.advance(loss=1.0)
            raise KeyboardInterrupt
    assert re.search(r"^train: stopped at 3/10 steps after [\d.]+ s \(KeyboardInterrupt\)$",
                     capsys.readouterr().out, re.M)
    assert common._ACTIVE == [] and common._LIVE == {}


@pytest.mark.slow
def test_a_first_run_reports_every_phase(tmp_path):
    """A harmodt smoke run with its data still to make, its output captured (not a terminal)."""
    pytest.importorskip("metaworld")
    from test_recipes import run

    p = run("recipe=harmodt", "debug=smoke", "threads=1", f"data_root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}")
    out = p.stdout
    for pattern in (r"^data: near_optimal, 2 tasks: started \(\d+ episodes",   # data
                    r"^data: \S+-v3 done, \d+ episodes in [\d.]+ s",
                    r"^data: near_optimal, 2 tasks: \d+/\d+ episodes \(100 %\)",
                    r"^data: near_optimal, 2 tasks: done in",
                    r"^train: started \(20 steps\)",                              # training
                    r"^train: 2/20 steps \(10 %\), [\d.]+ steps/s, loss [\d.]+, elapsed .*, ETA",
                    r"^train: 20/20 steps \(100 %\)",
                    r"^train: done in",
                    r"^mask update at step 10: \d+ swapped, \d+ revived, harmony",  # mask updates
                    r"^  evaluation at step 10: started \(2 tasks x 1 episode, 1 at a time",   # evaluation
                    r"^  evaluation at step 10: done in [\d.]+ s, mean success [\d.]+, held-out mse [\d.]+$",
                    r"^final evaluation after 20 steps: done in [\d.]+ s, mean success [\d.]+, held-out mse [\d.]+$"):
        assert re.search(pattern, out, re.M), f"{pattern!r} not in:\n{out}"
    assert (tmp_path / "run" / "curves.png").exists()


# ------------------------------------------------------------------------- threads

def test_threads_auto_is_a_small_thread_count():
    n = resolve_threads("auto")
    assert isinstance(n, int) and 1 <= n <= common.THREADS_AUTO_MAX
    assert n <= common.available_cores()
    assert resolve_threads(3) == 3 and resolve_threads(None) is None


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True, "2"])
def test_bad_threads_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"^threads="):
        resolve_threads(bad)


def test_bad_threads_fail_before_training(tmp_path):
    from test_recipes import run

    p = run("recipe=digits", "debug=smoke", "threads=lots", f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode != 0 and "threads='lots': expected an integer >= 1, auto" in p.stdout + p.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------- curves.png

def test_curves_show_the_loss_and_every_evaluation(tmp_path):
    tasks = ["reach-v3", "push-v3", "pick-place-v3"]
    rows = []
    for step in range(10, 301, 10):
        row = {"step": step, "train/loss": 1.0 / step, "train/lr": 1e-3}
        if step % 100 == 0:
            row |= {"mask/harmony": 0.1, "mask/swapped": 20.0}
        if step % 150 == 0 or step == 300:
            row |= {f"eval/{t}/success": (i + step // 150) % 3 / 2 for i, t in enumerate(tasks)}
            row["eval/mean_success"] = sum(row[f"eval/{t}/success"] for t in tasks) / len(tasks)
        rows.append(row)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_curves(metrics, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    ax_eval, ax_legend, ax_loss, ax_harmony = fig.axes
    assert [ln.get_label() for ln in ax_eval.lines] == [*tasks, "mean_success"]
    assert all(len(ln.get_xdata()) == 2 and ln.get_marker() not in (None, "None", "") for ln in ax_eval.lines)
    assert [t.get_text() for t in ax_legend.get_legend().get_texts()] == [*tasks, "mean_success"]
    loss = [ln for ln in ax_loss.lines if ln.get_label().startswith("train/loss")]
    assert len(loss) == 1 and len(loss[0].get_xdata()) == 30 and ax_loss.get_yscale() == "log"
    assert sum(ln.get_label() == "mask update" for ln in ax_loss.lines) == 1  # one legend entry, 3 lines
    assert len(ax_harmony.lines) == 1 and len(ax_harmony.lines[0].get_xdata()) == 3


def test_curves_of_a_run_without_evaluations_or_updates(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": 0.0 if s == 5 else 1.0}) + "\n"
                               for s in range(5, 30, 5)))
    fig = plot_curves(metrics, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").exists()
    assert fig.axes[2].get_yscale() == "linear"  # a zero loss: no log scale
    assert not fig.axes[0].lines and not fig.axes[3].lines
