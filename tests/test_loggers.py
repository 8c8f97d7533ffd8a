"""The ``logger`` group (recipes/loggers.py): TensorBoard event files mirror metrics.jsonl exactly,
also after a stop and resume; the figures arrive as images; a misspelt sink or a missing package
fails before training, naming what to do."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_loop import TASKS, Recipe, Stop, config, rows, stop_at

from maskmtl.config import ConfigError
from recipes.loggers import RunLog, TensorBoardSink, check_logger, logger_sinks, scalars

pytest.importorskip("tensorboard")  # the [logging] extra, installed by `make test`
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def events(directory: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """``{tag: [(step, value), ...]}`` and the image tags of the event files in ``directory``."""
    ea = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    return ({t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}, list(tags["images"]))


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numeric values as TensorBoard stores them (float32)."""
    want: dict[str, list[tuple[int, float]]] = {}
    for row in rows(out):
        for key, value in scalars({k: v for k, v in row.items() if k != "step"}).items():
            want.setdefault(key, []).append((row["step"], float(np.float32(value))))
    return want


def tb_config(*overrides):
    return config("logger=tensorboard", *overrides)


def test_events_mirror_the_metrics_log_and_carry_the_figures(tmp_path):
    cfg = tb_config()
    r = Recipe(cfg, tmp_path)
    r.loop.restore()
    r.loop.train()
    r.loop.log(cfg.train.steps, {"eval/final": 0.5, "note": "text stays in the jsonl only"})
    r.loop.finish(cfg, per_task={t: {"loss": 1.0} for t in TASKS}, headline="loss", title="t", table="t", extra={})
    got, images = events(tmp_path / "tensorboard")
    want = expected(tmp_path)
    assert got == want
    assert {"train/loss", "eval/a/loss", "mask/swapped", "eval/final"} <= set(got) and "note" not in got
    assert sorted(images) == ["figures/curves", "figures/diagnostics", "figures/masks"]


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """Stopped at step 13 (checkpoint at 10), resumed: the events equal an uninterrupted run's log,
    steps 11-13 of the first attempt gone from TensorBoard as from metrics.jsonl."""
    cfg = tb_config()
    first = Recipe(cfg, tmp_path, on_step=stop_at(13))
    first.loop.restore()
    with pytest.raises(Stop):
        first.loop.train()
    first.loop._sinks[0].flush()  # the killed attempt's rows reached its event file
    assert max(s for s, _ in events(tmp_path / "tensorboard")[0]["train/loss"]) == 12
    again = Recipe(cfg, tmp_path)
    assert again.loop.restore() == 10
    again.loop.train()
    again.loop._sinks[0].close()
    got, _ = events(tmp_path / "tensorboard")
    assert got == expected(tmp_path)
    assert [s for s, _ in got["train/loss"]] == list(range(3, 25, 3))
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_restart_keeps_rows_when_stopped_between_replay_and_cleanup(tmp_path, monkeypatch):
    """The replay is written before the earlier files go: a failure deleting them leaves rows
    twice in TensorBoard, never missing."""
    sink = TensorBoardSink(tmp_path)
    sink.log(1, {"x": 1.0})
    sink.close()
    sink = TensorBoardSink(tmp_path)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(OSError("busy")))
    with pytest.raises(OSError):
        sink.restart([{"step": 1, "x": 1.0}])
    sink.close()
    assert events(tmp_path)[0]["x"] == [(1, 1.0), (1, 1.0)]


def test_run_log_writes_jsonl_without_sinks(tmp_path):
    log = RunLog(tmp_path, [], resume_step=0)
    log.log(1, {"a": 1.0})
    log.close()
    assert rows(tmp_path) == [{"step": 1, "a": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_sink_choices_are_checked():
    assert logger_sinks(None) == [] and logger_sinks({}) == []
    assert logger_sinks({"wandb": {}, "tensorboard": {}}) == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"logger\.tensorbord: unknown logger sink"):
        logger_sinks({"tensorbord": {}})
    with pytest.raises(ConfigError, match="expected a logger option"):
        logger_sinks("tensorboard")


def test_a_missing_package_is_named_before_training(monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package.*pip install"):
        check_logger({"tensorboard": {"images": True}})


def test_wandb_without_the_package_is_refused_at_launch(tmp_path):
    """W&B is never a dependency: without it, logger=wandb stops at launch with what to install,
    and nothing is written into the run folder."""
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "recipe=digits", "debug=smoke",
                           "logger=wandb", f"hydra.run.dir={out}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "logger=wandb needs the wandb package" in proc.stdout + proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_recipe_run_with_tensorboard(tmp_path):
    """A real recipe (digits, smoke size) through tools/run.py writes the events beside its log."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), "recipe=digits", "debug=smoke",
                    "logger=tensorboard", f"hydra.run.dir={out}"], check=True, capture_output=True, cwd=ROOT)
    got, images = events(out / "tensorboard")
    assert got == expected(out) and "figures/curves" in images


class FakeWandb:
    """Records what the W&B sink asks of the wandb package (its API: init, Run.log, Image, finish)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, data, step):
                fake.logged.append((step, data))

            def finish(self):
                fake.finished += 1
        self.Run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()

    class Image:
        def __init__(self, path):
            self.path = path


def test_wandb_sink_logs_rows_and_figures_and_resumes_the_same_run(tmp_path, monkeypatch):
    """Without the package here, against a stand-in for its API: the run id is kept in the run
    folder so a resume continues the same W&B run; rows go with their steps, figures as images."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from recipes.loggers import open_sinks

    cfg = config("logger=wandb", "logger.wandb.mode=offline")
    r = Recipe(cfg, tmp_path)
    r.loop.restore()
    r.loop.train()
    r.loop.finish(cfg, per_task={t: {"loss": 1.0} for t in TASKS}, headline="loss", title="t", table="t", extra={})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert fake.inits[0]["id"] == run_id and fake.inits[0]["resume"] == "allow" and fake.inits[0]["mode"] == "offline"
    steps = [s for s, d in fake.logged if "train/loss" in d]
    assert steps == [x["step"] for x in rows(tmp_path) if "train/loss" in x]
    step, figures = fake.logged[-1]
    assert step == cfg.train.steps and sorted(figures) == ["figures/curves", "figures/diagnostics", "figures/masks"]
    assert fake.finished == 1
    open_sinks(tmp_path, {"wandb": {"mode": "offline"}})  # the same folder again: the same W&B run
    assert fake.inits[1]["id"] == run_id
    for refuse in (check_logger, lambda c: open_sinks(tmp_path, c)):  # at launch, and where the sink opens
        with pytest.raises(ConfigError, match=r"logger\.wandb\.mode='later'"):
            refuse({"wandb": {"mode": "later"}})
