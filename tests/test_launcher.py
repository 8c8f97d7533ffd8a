"""hydra/launcher=local's packing (hydra_plugins/maskmtl_launcher): ``max_parallel`` caps the jobs
running at once, ``jobs_per_gpu`` packs K jobs per GPU (each job sees its one GPU), ``job_threads``
shares the CPUs among the jobs at once; bad values are refused naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

# LaunchConfigError is a ValueError; Hydra's plugin scan may execute the module again (another class
# object of the same name), so the tests match ValueError and the message
from hydra_plugins.maskmtl_launcher.launcher import job_slots, job_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "launcher_app" / "app.py"


def sweep(tmp_path: Path, *overrides: str, jobs: int, timeout: float = 240) -> tuple[subprocess.CompletedProcess,
                                                                                      list[dict]]:
    rec = tmp_path / "records"
    rec.mkdir(exist_ok=True)
    env = {**os.environ, "MASKMTL_CONF": str(ROOT / "conf"), "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, str(APP), "-m", f"job={','.join(map(str, range(jobs)))}",
                        f"record_dir={rec}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return p, [json.loads(f.read_text()) for f in sorted(rec.glob("*.json"))]


def most_at_once(records: list[dict], key=None) -> int:
    """The most jobs (of the same ``key(record)``) whose [start, end] intervals overlap at one time."""
    best = 0
    for r in records:
        t = r["start"] + 1e-6
        best = max(best, sum(1 for q in records if q["start"] <= t < q["end"]
                             and (key is None or key(q) == key(r))))
    return best


def test_job_slots_and_threads():
    assert job_slots(5, None, None, None) == [None] * 5            # unpacked: every job at once
    assert job_slots(5, 2, None, None) == [None, None]
    assert job_slots(3, 8, None, None) == [None] * 3               # never more slots than jobs
    assert job_slots(9, None, 2, [0, 1, 3]) == [0, 1, 3, 0, 1, 3]  # K per GPU, every GPU's first slot first
    assert job_slots(9, 4, 2, [0, 1, 3]) == [0, 1, 3, 0]
    assert job_threads("auto", 4, cpus=16) == 4 and job_threads("auto", 3, cpus=2) == 1
    assert job_threads(None, 4) is None and job_threads(3, 4) == 3


@pytest.mark.parametrize("args,message", [
    ((4, 0, None, None), "hydra.launcher.max_parallel=0: expected an integer >= 1"),
    ((4, None, "two", None), "hydra.launcher.jobs_per_gpu='two'"),
    ((4, None, 2, [0, 0]), "hydra.launcher.gpus=[0, 0]: expected a list of distinct GPU indices"),
    ((4, None, 2, []), "hydra.launcher.gpus=[]"),
    ((4, 2, None, [0]), "hydra.launcher.gpus=[0] is read only with hydra.launcher.jobs_per_gpu"),
])
def test_bad_packing_values_name_the_key(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        job_slots(*args)
    with pytest.raises(ValueError, match="hydra.launcher.job_threads=0"):
        job_threads(0, 2)


def test_jobs_per_gpu_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setitem(job_slots.__globals__, "_visible_gpus", lambda: [])  # the module job_slots runs in
    with pytest.raises(ValueError, match="this process sees no GPU"):
        job_slots(4, None, 2, None)


@pytest.mark.slow
def test_max_parallel_caps_the_jobs_running_at_once(tmp_path):
    p, records = sweep(tmp_path, "hydra.launcher.max_parallel=2", "sleep_s=2", jobs=5)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sorted(r["job"] for r in records) == list(range(5))
    assert most_at_once(records) == 2  # two at a time, and the slots were reused (5 jobs ran)
    assert all(r["threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for r in records)  # job_threads=auto
    assert "packing 5 jobs: 2 at once" in p.stderr + p.stdout


@pytest.mark.slow
def test_jobs_per_gpu_packs_k_jobs_on_each_named_gpu(tmp_path):
    """GPU indices are only handed out here (the jobs do not touch CUDA), so this runs on a CPU machine."""
    p, records = sweep(tmp_path, "hydra.launcher.jobs_per_gpu=2", "hydra.launcher.gpus=[3,5]",
                       "hydra.launcher.job_threads=null", "sleep_s=1.5", jobs=6)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sorted(r["job"] for r in records) == list(range(6))
    assert {r["cuda"] for r in records} == {"3", "5"}          # each job sees its one GPU
    assert most_at_once(records, key=lambda r: r["cuda"]) == 2  # K = 2 per GPU
    assert most_at_once(records) == 4
    assert all(r["threads"] == "auto" for r in records)         # job_threads=null: the jobs' own setting


@pytest.mark.slow
def test_a_packed_sweep_reports_a_failed_job_and_runs_the_rest(tmp_path):
    """One job at a time: the failing job frees its slot and is reported with its log; the jobs after it
    still run. A sweep whose overrides set threads= keeps them."""
    p, records = sweep(tmp_path, "hydra.launcher.max_parallel=1", "sleep_s=0.2", "threads=7", "fail_jobs=[1]",
                       jobs=3)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "1 of 3 jobs failed" in out and "job=1" in out
    line = next(x for x in out.splitlines() if "job=1" in x and "log: " in x)
    log = Path(line.split("log: ")[1].split(" (stdout")[0])
    assert log.exists() and "job 1 fails as asked" in log.read_text()
    assert sorted(r["job"] for r in records) == [0, 2] and all(r["threads"] == 7 for r in records)
    assert most_at_once(records) == 1
