"""tools/report.py's 95 % intervals over seeds and its paired differences against a baseline row,
against a case worked by hand (t quantiles from a table) and numpy percentiles drawn in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_report import fake_run, only, read_csv, report

T_975 = {1: 12.7062047, 2: 4.3026527}  # Student t, 97.5 % quantile (printed tables), by degrees of freedom

# method × variant × seed -> the run's mean accuracy (each of the 3 tasks gets that value)
VALUES = {("a", "v1"): {0: 0.5, 1: 0.6, 2: 0.7},
          ("b", "v1"): {0: 0.4, 1: 0.45, 3: 0.9},    # baseline; seeds 2 (of a) and 3 (of b) have no partner
          ("a", "v2"): {0: 0.2, 1: 0.3},
          ("b", "v2"): {0: 0.1, 1: 0.1},
          ("c", "v1"): {5: 0.8}}                     # one seed: no interval, and no pair


@pytest.fixture
def sweep(tmp_path):
    i = 0
    for (method, variant), by_seed in VALUES.items():
        for seed, v in by_seed.items():
            fake_run(tmp_path / str(i), {"method": method, "variant": variant}, seed, [v] * 3, {100: [v] * 3})
            i += 1
    return tmp_path


def by_cell(path):
    return {(r["method"], r["variant"]): r for r in read_csv(path)}


def t_by_hand(xs):
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = T_975[n - 1] * s / math.sqrt(n)
    return m - h, m + h


def boot_by_numpy(xs):
    idx = np.random.default_rng(0).integers(0, len(xs), size=(10_000, len(xs)))
    return np.percentile(np.asarray(xs)[idx].mean(axis=1), [2.5, 97.5])


def test_intervals_of_each_cell(sweep):
    assert report.main([str(sweep), "--rows", "method", "--cols", "variant"]) == 0
    rows = by_cell(only("reports/report_*.csv", sweep))
    # a/v1: 0.5, 0.6, 0.7 -> mean 0.6, s = 0.1, half-width 4.3027 · 0.1/√3 = 0.24841
    lo, hi = float(rows["a", "v1"]["ci_t_lo"]), float(rows["a", "v1"]["ci_t_hi"])
    assert (lo, hi) == pytest.approx((0.6 - 0.248414, 0.6 + 0.248414), abs=1e-6)
    for key, xs in VALUES.items():
        row = rows[key]
        if len(xs) < 2:
            assert row["ci_t_lo"] == row["ci_t_hi"] == row["ci_boot_lo"] == row["ci_boot_hi"] == ""
            continue
        assert (float(row["ci_t_lo"]), float(row["ci_t_hi"])) == pytest.approx(t_by_hand(list(xs.values())), abs=1e-6)
        assert [float(row["ci_boot_lo"]), float(row["ci_boot_hi"])] == pytest.approx(
            list(boot_by_numpy(list(xs.values()))), abs=1e-12)
        assert row["baseline"] == row["diff_mean"] == ""  # no --baseline
    md = only("reports/report_*.md", sweep).read_text()
    assert "95 % CI, t-interval" in md and "[0.3516, 0.8484] (n=3)" in md
    assert "0.8000 ± 0.0000 (n=1)" in md  # n < 2: no interval
    assert "paired difference" not in md


def test_bootstrap_is_shown_on_request(sweep):
    assert report.main([str(sweep), "--rows", "method", "--cols", "variant", "--ci", "bootstrap"]) == 0
    md = only("reports/report_*.md", sweep).read_text()
    lo, hi = boot_by_numpy([0.5, 0.6, 0.7])
    assert "bootstrap percentile, B=10,000" in md and f"[{lo:.4f}, {hi:.4f}] (n=3)" in md


def test_paired_differences_against_a_baseline_row(sweep, capsys):
    assert report.main([str(sweep), "--rows", "method", "--cols", "variant", "--baseline", "method=b"]) == 0
    rows = by_cell(only("reports/report_*.csv", sweep))
    # a/v1 − b/v1, paired by seed: seeds 0 and 1 -> [0.1, 0.15]; mean 0.125, s = 0.035355,
    # half-width 12.7062 · 0.035355/√2 = 0.317655; seed 2 (a) and seed 3 (b) unpaired
    r = rows["a", "v1"]
    assert r["baseline"] == "method=b" and r["diff_n"] == "2"
    assert float(r["diff_mean"]) == pytest.approx(0.125, abs=1e-12)
    assert (float(r["diff_ci_t_lo"]), float(r["diff_ci_t_hi"])) == pytest.approx((0.125 - 0.317655, 0.125 + 0.317655),
                                                                                 abs=1e-6)
    assert [float(r["diff_ci_boot_lo"]), float(r["diff_ci_boot_hi"])] == pytest.approx(
        list(boot_by_numpy([0.6 - 0.45, 0.5 - 0.4][::-1])), abs=1e-12)
    assert r["diff_unpaired_seeds"] == "2" and r["diff_baseline_only_seeds"] == "3"
    # a/v2 − b/v2, within its own column: [0.1, 0.2]
    r2 = rows["a", "v2"]
    assert float(r2["diff_mean"]) == pytest.approx(0.15, abs=1e-12) and r2["diff_n"] == "2"
    assert (float(r2["diff_ci_t_lo"]), float(r2["diff_ci_t_hi"])) == pytest.approx(t_by_hand([0.1, 0.2]), abs=1e-6)
    assert r2["diff_unpaired_seeds"] == r2["diff_baseline_only_seeds"] == ""
    assert rows["b", "v1"]["diff_n"] == "self" and rows["b", "v2"]["diff_n"] == "self"
    # c/v1 (seed 5) has no partner among b/v1's seeds 0, 1, 3
    c = rows["c", "v1"]
    assert c["diff_n"] == "0" and c["diff_mean"] == "" and c["diff_unpaired_seeds"] == "5"
    md = only("reports/report_*.md", sweep).read_text()
    assert "## paired difference vs method=b (same column, same seed)" in md
    assert "+0.1250 [-0.1927, 0.4427] (2 pairs)" in md and "| method=b | baseline | baseline |" in md
    assert "no pairs" in md
    assert ("paired differences: method=a / variant=v1 vs method=b: seed 2 without a baseline run; baseline seed 3 "
            "without a run here (left out of the pairs)") in md
    assert only("reports/report_*.png", sweep).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "paired difference vs method=b" in out and "+0.1250" in out


def test_a_missing_baseline_cell_is_reported(tmp_path):
    fake_run(tmp_path / "0", {"method": "a", "variant": "v1"}, 0, [0.5] * 3, {100: [0.5] * 3})
    fake_run(tmp_path / "1", {"method": "a", "variant": "v2"}, 0, [0.5] * 3, {100: [0.5] * 3})
    fake_run(tmp_path / "2", {"method": "b", "variant": "v1"}, 0, [0.4] * 3, {100: [0.4] * 3})
    assert report.main([str(tmp_path), "--rows", "method", "--cols", "variant", "--baseline", "method=b"]) == 0
    rows = by_cell(only("reports/report_*.csv", tmp_path))
    assert rows["a", "v2"]["diff_n"] == "missing" and rows["a", "v1"]["diff_n"] == "1"
    md = only("reports/report_*.md", tmp_path).read_text()
    assert "method=a / variant=v2 has no baseline cell method=b in its column" in md


@pytest.mark.parametrize("args,status,needle", [
    (["--baseline", "method"], 2, "expected KEY=VALUE pairs"),
    (["--baseline", "method=b,method=a"], 2, "method given twice"),
    (["--baseline", "method=zzz"], 1, "no row has method=zzz (values of method: a, b, c)"),
    (["--baseline", "variant=v1"], 1, "'variant' is not a row factor (rows: method)"),
    (["--ci", "normal"], 2, "invalid choice: 'normal'"),
])
def test_bad_baseline_and_ci_options(sweep, capsys, args, status, needle):
    assert report.main([str(sweep), "--rows", "method", "--cols", "variant", *args]) == status
    assert needle in capsys.readouterr().err
    assert not (sweep / "reports").exists() or not list((sweep / "reports").iterdir())


def test_interval_functions_directly():
    assert report.t_interval([1.0]) is None and report.bootstrap_interval([1.0]) is None
    assert report.t_interval([1.0, float("nan")]) is None
    assert report.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert report.t_interval([0.5, 0.6, 0.7]) == pytest.approx(t_by_hand([0.5, 0.6, 0.7]), abs=1e-6)
