"""Sweeps through a real SLURM (the local single-node cluster of tools/slurm_local.sh): a job array
of smoke runs and the report over it, a failed job reported with its log while the others finish, and
a job signalled mid-run that checkpoints, is requeued and resumes to the same result.

Start the cluster first (`bash tools/slurm_local.sh start`, as .ci/run does). Without it these tests
skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONF = Path(os.environ.get("MASKMTL_SLURM_DIR", "/var/tmp/maskmtl-slurm")) / "etc" / "slurm.conf"


@pytest.fixture(scope="module")
def slurm_env():
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if "SLURM_CONF" not in env and LOCAL_CONF.exists():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    reason = None
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        reason = "no SLURM client (sbatch/sacct) on PATH"
    else:
        try:
            sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True, timeout=20)
            sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], env=env, capture_output=True, text=True,
                                   timeout=20)
        except subprocess.TimeoutExpired:
            reason = "sinfo/sacct did not answer within 20 s"
        else:
            if sinfo.returncode != 0 or not sinfo.stdout.strip().startswith(("idle", "mix", "alloc")):
                reason = f"no SLURM node ready (sinfo: {(sinfo.stdout + sinfo.stderr).strip()[:200]!r})"
            elif sacct.returncode != 0:
                reason = f"SLURM accounting (sacct) unavailable: {sacct.stderr.strip()[:200]!r}"
    if reason:
        reason += "; start the local cluster with `bash tools/slurm_local.sh start`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and SLURM is not usable: {reason}")
        pytest.skip(reason)
    return env


def sweep_cmd(sweep: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "run.py"), "-m", "recipe=digits", "debug=smoke", *overrides,
            "hydra/launcher=slurm", "hydra.launcher.timeout_min=10", f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={sweep}"]


def cancel(name: str, env: dict) -> None:
    subprocess.run(["scancel", "-n", name], env=env, capture_output=True, timeout=20)


def run_sweep(cmd: list[str], name: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except BaseException:
        cancel(name, env)  # nothing of this test may stay queued
        raise
    if p.returncode != 0:
        cancel(name, env)
    return p


@pytest.mark.slow
def test_sweep_of_four_jobs_through_slurm_and_report(tmp_path, slurm_env):
    sweep, name = tmp_path / "sweep", f"maskmtl-test-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    p = run_sweep(sweep_cmd(sweep, name, "scorer=fisher,magnitude", "seed=0,1"), name, slurm_env)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all 4 jobs completed" in p.stdout + p.stderr
    # one job array: every job's submitit folder is <array id>_<index>
    folders = sorted(d.name for d in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name))
    assert len(folders) == 4 and len({f.split("_")[0] for f in folders}) == 1
    assert sorted(f.split("_")[1] for f in folders) == ["0", "1", "2", "3"]
    results = {d.name: json.loads((d / "results.json").read_text()) for d in sweep.iterdir() if (d / "results.json").exists()}
    assert sorted(results) == ["0", "1", "2", "3"]
    assert {(r["options"]["scorer"], r["seed"]) for r in results.values()} == {
        ("fisher", 0), ("fisher", 1), ("magnitude", 0), ("magnitude", 1)}
    assert all(r["steps"] == 20 and r["resumed_from"] is None for r in results.values())
    print(f"sweep of 4 smoke jobs through SLURM: {wall:.1f} s")

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(sweep)], cwd=ROOT, env=slurm_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(next((sweep / "reports").glob("report_*.csv"))) as f:
        rows = {row["scorer"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"fisher", "magnitude"}
    for scorer, row in rows.items():
        values = [x["mean"]["accuracy"] for x in results.values() if x["options"]["scorer"] == scorer]
        assert row["n"] == "2" and row["n_partial"] == "0" and row["seeds"] == "0 1"
        assert float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)


@pytest.mark.slow
def test_failed_job_is_reported_with_its_log_and_the_others_complete(tmp_path, slurm_env):
    sweep, name = tmp_path / "sweep", f"maskmtl-test-{uuid.uuid4().hex[:8]}"
    p = run_sweep(sweep_cmd(sweep, name, "train.task_sampling=round_robin,sometimes"), name, slurm_env)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "1 of 2 jobs failed" in out and "train.task_sampling='sometimes'" in out
    line = next(x for x in out.splitlines() if "train.task_sampling=sometimes): " in x)
    log = Path(line.split("log: ")[1].split(" (stdout")[0])
    assert log.exists() and "ConfigError: train.task_sampling='sometimes'" in log.read_text()
    assert (sweep / "0" / "results.json").exists() and not (sweep / "1" / "results.json").exists()


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return 0


@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_resumes_to_the_same_result(tmp_path, slurm_env):
    """Two identical jobs (seed=0,0); job 0 gets SLURM's preemption signal (USR2, as sent before a time
    limit) mid-run. It must checkpoint at that step (no periodic checkpoints: checkpoint_every=0),
    be requeued, resume from that step, and end exactly like job 1, which ran uninterrupted."""
    sweep, name = tmp_path / "sweep", f"maskmtl-test-{uuid.uuid4().hex[:8]}"
    cmd = sweep_cmd(sweep, name, "seed=0,0", "train.steps=1500", "train.checkpoint_every=0", "train.eval_every=100",
                    "train.log_every=20")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while last_step(sweep / "0" / "metrics.jsonl") < 200:  # well inside the run
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "job 0 did not reach step 200 within 150 s"
            time.sleep(0.5)
        queue = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=slurm_env, capture_output=True, text=True,
                               timeout=20).stdout.split()
        job0 = next(j for j in queue if j.endswith("_0"))
        signalled_at = last_step(sweep / "0" / "metrics.jsonl")
        subprocess.run(["scancel", "--signal=USR2", job0], env=slurm_env, check=True, timeout=20)
        out, _ = proc.communicate(timeout=240)
    except BaseException:
        proc.kill()
        cancel(name, slurm_env)
        raise
    assert proc.returncode == 0, out[-3000:]
    a, b = (json.loads((sweep / i / "results.json").read_text()) for i in "01")
    assert b["resumed_from"] is None
    assert a["resumed_from"] is not None and a["resumed_from"] >= signalled_at > 0  # resumed mid-run, not step 0
    assert a["per_task"] == b["per_task"] and a["steps"] == b["steps"] == 1500
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / job0).glob("*.out"))
    assert f"step {a['resumed_from']}: SIGUSR2 received" in logs and "Requeued job" in logs
    assert f"resumed from {sweep / '0' / 'checkpoint.pt'} at step {a['resumed_from']}" in logs


@pytest.mark.slow
def test_preemption_signal_outside_slurm_checkpoints_that_step_and_the_same_command_resumes(tmp_path):
    """No scheduler needed: the process sends itself the preemption signal after step 13
    (MASKMTL_PREEMPT_AT_STEP); the loop checkpoints at the next step boundary (14, between the
    periodic checkpoints at 10 and 20), exits non-zero, and re-running resumes there to the result of
    an uninterrupted run."""
    common = [sys.executable, str(ROOT / "tools" / "run.py"), "recipe=digits", "debug=smoke", "train.steps=30",
              "train.checkpoint_every=10", "train.task_sampling=uniform"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    run = lambda d, **e: subprocess.run([*common, f"hydra.run.dir={tmp_path / d}"], cwd=ROOT, env={**env, **e},  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    ref = subprocess.Popen([*common, f"hydra.run.dir={tmp_path / 'a'}"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stopped = run("b", MASKMTL_PREEMPT_AT_STEP="13")
        assert stopped.returncode != 0 and not (tmp_path / "b" / "results.json").exists()
        assert "step 14: SIGUSR2 received" in stopped.stdout
        assert "run the same command again to resume" in stopped.stderr
        resumed = run("b")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ref.wait(timeout=300) == 0
    finally:
        ref.kill()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert b["resumed_from"] == 14 and a["resumed_from"] is None
    assert a["per_task"] == b["per_task"]


def test_preemption_handler_contract():
    """In-process: the signal only sets a flag; stop() calls the previous handler (submitit's requeue)
    and otherwise exits with a message; leaving the loop normally keeps absorbing the signal, leaving it
    by an exception restores the previous handler."""
    import signal

    from recipes.common import Preemption, preemption_signal

    sig = preemption_signal()
    calls = []
    previous = signal.signal(sig, lambda s, f: calls.append(s))
    try:
        with Preemption() as p:
            assert not p.requested
            os.kill(os.getpid(), sig)
            assert p.requested and calls == []  # the previous handler is not run by the signal itself
            with pytest.raises(SystemExit, match="stopped at step 7 on SIGUSR2"):
                p.stop(7, Path("ckpt.pt"))
            assert calls == [sig]  # handed over first
        with pytest.raises(RuntimeError):
            with Preemption():
                raise RuntimeError
        os.kill(os.getpid(), sig)
        assert calls == [sig, sig]  # restored after the exception
        with Preemption() as p:
            pass
        os.kill(os.getpid(), sig)
        assert p.requested and calls == [sig, sig]  # finishing: absorbed
    finally:
        signal.signal(sig, previous)
