"""recipes/locomotion/figure.py: return per task against its goal, per method, from results.json files."""

from __future__ import annotations

import json

import pytest

from recipes.locomotion.figure import FigureError, data_returns, main, read_runs


def fake_run(folder, method, seed, train, unseen=None, benchmark="locomotion"):
    folder.mkdir(parents=True)
    r = {"benchmark": benchmark, "method": method, "seed": seed, "tasks": list(train),
         "per_task": {t: {"return": v} for t, v in train.items()},
         "unseen": None if unseen is None else {"per_task": {t: {"return": v} for t, v in unseen.items()}}}
    (folder / "results.json").write_text(json.dumps(r))


def fake_data(folder, returns, demos):
    (folder / "demos-1").mkdir(parents=True)
    for t, v in returns.items():
        (folder / f"{t}.json").write_text(json.dumps({"task": t, "stats": {"return_mean": v}}))
    for t, v in demos.items():
        (folder / "demos-1" / f"{t}.json").write_text(json.dumps({"task": t, "stats": {"return_mean": v}}))


def test_runs_grouped_by_method_with_unseen_tasks_and_a_figure(tmp_path):
    train = {"cheetah_vel-0": -30.0, "cheetah_vel-1": -60.0}
    fake_run(tmp_path / "runs" / "a", "prompt_dt", 0, train, {"cheetah_vel-2": -90.0})
    fake_run(tmp_path / "runs" / "b", "prompt_dt", 1, {"cheetah_vel-0": -20.0, "cheetah_vel-1": -70.0},
             {"cheetah_vel-2": -80.0})
    fake_run(tmp_path / "runs" / "c", "mtdt", 0, train)
    family, runs = read_runs([tmp_path / "runs"])
    assert family == "cheetah_vel" and set(runs) == {"prompt_dt", "mtdt"}
    assert runs["prompt_dt"]["train"]["cheetah_vel-0"] == [-30.0, -20.0]
    assert runs["prompt_dt"]["unseen"]["cheetah_vel-2"] == [-90.0, -80.0] and not runs["mtdt"]["unseen"]
    fake_data(tmp_path / "data", {"cheetah_vel-0": -15.0, "cheetah_vel-1": -16.0}, {"cheetah_vel-0": -14.0,
                                                                                    "cheetah_vel-2": -17.0})
    assert data_returns(tmp_path / "data") == {"cheetah_vel-0": -15.0, "cheetah_vel-1": -16.0, "cheetah_vel-2": -17.0}
    out = tmp_path / "fig.png"
    assert main([str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    assert main([str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--out", str(out)]) == 1  # never replaced
    assert out.read_bytes() == before


def test_bad_inputs_name_what_is_wrong(tmp_path, capsys):
    with pytest.raises(FigureError, match="no results.json under"):
        read_runs([tmp_path])
    fake_run(tmp_path / "mw", "prompt_dt", 0, {"reach-v3": 0.5}, benchmark="metaworld")
    with pytest.raises(FigureError, match="benchmark 'metaworld', expected a locomotion run"):
        read_runs([tmp_path / "mw"])
    fake_run(tmp_path / "two" / "a", "prompt_dt", 0, {"cheetah_vel-0": -1.0})
    fake_run(tmp_path / "two" / "b", "prompt_dt", 0, {"cheetah_dir-0": 1.0})
    with pytest.raises(FigureError, match="one figure takes one family"):
        read_runs([tmp_path / "two"])
    with pytest.raises(FigureError, match="not a folder"):
        data_returns(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "two" / "a"), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "f.png")]) == 1
    assert "no <task>.json sidecars" in capsys.readouterr().err and not (tmp_path / "f.png").exists()
