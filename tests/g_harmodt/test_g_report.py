"""The sweep report's task-agnostic picture: metric and gate accuracy vs number of groups."""

from __future__ import annotations

import json

from test_report import fake_run, report


def add_gate(d, n_groups: int, method: str, heldout: float, rollout: float | None) -> None:
    r = json.loads((d / "results.json").read_text())
    r.update(n_groups=n_groups, method=method,
             gate={"heldout": {"overall": heldout}, "rollout": {"overall": rollout}} if heldout is not None else None)
    (d / "results.json").write_text(json.dumps(r))


def test_groups_points_and_png(tmp_path, capsys):
    rows = [("g_harmodt", 2, 0, [0.5, 0.5, 0.5], 0.9, 0.8), ("g_harmodt", 2, 1, [0.25, 0.25, 0.25], 0.7, 0.6),
            ("g_harmodt", 5, 0, [0.375, 0.375, 0.375], 0.6, None), ("ta_prompt_dt", 3, 0, [0.125, 0.125, 0.125], None, None)]
    for k, (method, n, seed, acc, held, roll) in enumerate(rows):
        d = tmp_path / str(k)
        fake_run(d, {"method": method}, seed, acc, {10: acc})
        add_gate(d, n, method, held, roll)
    runs, metric, _ = report.load_runs(tmp_path)
    pts = report.groups_points(runs, metric)
    assert pts["g_harmodt"][2] == {"accuracy": [0.5, 0.25], "heldout": [0.9, 0.7], "rollout": [0.8, 0.6]}
    assert pts["g_harmodt"][5] == {"accuracy": [0.375], "heldout": [0.6]}
    assert pts["ta_prompt_dt"][3] == {"accuracy": [0.125]}  # no gate: success only
    assert report.main([str(tmp_path)]) == 0
    assert len(list((tmp_path / "reports").glob("*_groups.png"))) == 1


def test_no_groups_png_for_other_recipes(tmp_path):
    fake_run(tmp_path / "0", {"scorer": "fisher"}, 0, [0.5, 0.5, 0.5], {10: [0.5, 0.5, 0.5]})
    assert report.main([str(tmp_path)]) == 0
    assert not list((tmp_path / "reports").glob("*_groups.png"))
