"""Hydra launchers for sweeps on SLURM (``hydra/launcher=slurm``) and in local processes
(``hydra/launcher=local``), built on hydra-submitit-launcher.

They differ from the plugin's own launchers in one way: the plugin returns at the first failed job
(``[j.results()[0] for j in jobs]``); these wait for every job of the array, then print one line per
failed job with its overrides and log files, so one failure neither hides the others nor stops
gathering their results. The jobs themselves are independent SLURM array tasks either way.

Packing (``hydra/launcher=local`` only): ``max_parallel`` caps how many jobs run at once (submitit's
local executor starts every job of the array together), and ``jobs_per_gpu`` = K packs K jobs on
each GPU of ``gpus`` (default: every GPU torch sees), each job seeing its one GPU only
(``CUDA_VISIBLE_DEVICES``); a job starts as soon as a slot frees. ``job_threads`` (default
``auto``) then gives each job ``threads`` = the CPUs this process may use // the jobs running at
once, unless the job's overrides set ``threads`` themselves, so that K jobs' CPU work does not
contend. Without either key every job starts at once, as before.

Requeue: on SLURM's preemption/timeout signal submitit calls the launcher's ``checkpoint`` (inherited:
resubmit the same job with the same overrides, hence the same run directory) and requeues the job;
the recipe's loop saves a checkpoint first (``recipes.common.Preemption``) and the requeued job
resumes from it (``recipes.common.resume_point``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import make_dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf
except ImportError as e:  # Hydra imports every plugin module at start-up: fail only when chosen
    _missing = e

    class SlurmLauncher:  # noqa: D101
        def __init__(self, **_: Any) -> None:
            raise ImportError(f"hydra/launcher=slurm|local needs hydra-submitit-launcher and submitit "
                              f"(pip install -e '.[slurm]'): {_missing}")

    LocalLauncher = SlurmLauncher
    plugin = None


PACKING_KEYS = ("max_parallel", "jobs_per_gpu", "gpus", "job_threads")


class LaunchConfigError(ValueError):
    """A ``hydra.launcher.*`` packing key with a value it cannot take (named in the message)."""


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _visible_gpus() -> list[int]:
    """GPU indices this process may hand out: those torch sees (0..n-1 of CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


def job_slots(n_jobs: int, max_parallel: Any, jobs_per_gpu: Any, gpus: Any) -> list[int | None]:
    """The slots jobs run in: one entry per job running at once, the GPU index of a packed slot or
    ``None`` (no GPU assigned). Errors name the ``hydra.launcher`` key."""
    def positive(key, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise LaunchConfigError(f"hydra.launcher.{key}={v!r}: expected an integer >= 1 or null")
        return v
    max_parallel, jobs_per_gpu = positive("max_parallel", max_parallel), positive("jobs_per_gpu", jobs_per_gpu)
    if gpus is not None and (not isinstance(gpus, (list, tuple)) or not gpus
                             or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)
                             or len(set(gpus)) != len(gpus)):
        raise LaunchConfigError(f"hydra.launcher.gpus={gpus!r}: expected a list of distinct GPU indices >= 0, "
                                f"e.g. [0,1], or null (every GPU torch sees)")
    if jobs_per_gpu is None:
        if gpus is not None:
            raise LaunchConfigError(f"hydra.launcher.gpus={list(gpus)} is read only with hydra.launcher.jobs_per_gpu "
                                    f"(how many jobs share each GPU)")
        return [None] * min(max_parallel or n_jobs, n_jobs)
    gpus = list(gpus) if gpus is not None else _visible_gpus()
    if not gpus:
        raise LaunchConfigError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: this process sees no GPU "
                                f"(torch.cuda.device_count() is 0); name them with hydra.launcher.gpus or unset "
                                f"jobs_per_gpu")
    slots = [g for _ in range(jobs_per_gpu) for g in gpus]  # round-robin: fill every GPU's first slot first
    return slots[:min(max_parallel or len(slots), len(slots), n_jobs)]


def job_threads(setting: Any, running: int, cpus: int | None = None) -> int | None:
    """``threads`` for each of ``running`` jobs at once (``None``: leave the jobs' own setting)."""
    if setting is None:
        return None
    if setting == "auto":
        return max(1, (cpus or _cpus()) // running)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise LaunchConfigError(f"hydra.launcher.job_threads={setting!r}: expected auto, an integer >= 1, or null "
                                f"(the jobs' own threads)")
    return setting


def _job_logs(job) -> str:
    return f"{job.paths.stderr} (stdout: {job.paths.stdout})"


class _GatheringLauncher(plugin.BaseSubmititLauncher if plugin else object):
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs inside the job. Hydra catches the task's exception into the JobReturn; print its
        traceback so that the job's log file says why it failed."""
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            import traceback

            traceback.print_exception(ret._return_value, file=sys.stderr)
            sys.stderr.flush()
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        # Executor set-up as in the plugin's BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2).
        init_keys = {"max_num_timeout"}
        packing = {k: self.params.get(k) for k in PACKING_KEYS}
        init_params = {"folder": self.params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in init_keys | {"submitit_folder"} | set(PACKING_KEYS)})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"submitit '{self._EXECUTOR}' sweep of {len(job_overrides)} jobs into {sweep_dir}")
        packed = packing["max_parallel"] is not None or packing["jobs_per_gpu"] is not None
        if packed and self._EXECUTOR != "local":
            raise LaunchConfigError(f"hydra.launcher.max_parallel / jobs_per_gpu pack jobs of hydra/launcher=local; "
                                    f"on SLURM use array_parallelism and gpus_per_node")
        slots = job_slots(len(job_overrides), packing["max_parallel"], packing["jobs_per_gpu"], packing["gpus"]) \
            if packed else []
        threads = job_threads(packing.get("job_threads", "auto"), len(slots)) if packed else None
        job_overrides = [list(o) if threads is None or any(x.startswith("threads=") for x in o)
                         else [*o, f"threads={threads}"] for o in job_overrides]
        params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        if packed:
            gpus = sorted({g for g in slots if g is not None})
            log.info(f"packing {len(params)} jobs: {len(slots)} at once"
                     + (f", {packing['jobs_per_gpu']} per GPU on GPUs {gpus}" if gpus else "")
                     + (f", threads={threads} each" if threads is not None else ""))
            jobs = self._run_packed(executor, params, slots)
        else:
            jobs = executor.map_array(self, *zip(*params))
            log.info(f"submitted job array {jobs[0].job_id.split('_')[0]}; submitit logs in {jobs[0].paths.folder}")

        # Wait for every job; collect failures instead of stopping at the first.
        returns: list[JobReturn] = []
        failed: list[str] = []
        for idx, (overrides, job) in enumerate(zip(job_overrides, jobs), start=initial_job_idx):
            error = job.exception()  # waits; None when the job process finished and returned
            if error is None:
                ret = job.results()[0]
                if ret.status == JobStatus.FAILED:  # the task raised inside the job (Hydra caught it)
                    failed.append(f"#{idx} job {job.job_id} ({' '.join(overrides)}): "
                                  f"{type(ret._return_value).__name__}: {ret._return_value}; log: {_job_logs(job)}")
            else:  # the job died: killed, out of time, not requeued, ...
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                failed.append(f"#{idx} job {job.job_id} ({' '.join(overrides)}): {first}; log: {_job_logs(job)}")
                ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                                _return_value=RuntimeError(f"job {job.job_id} failed: {first}\nlog: {_job_logs(job)}"))
            returns.append(ret)
        if failed:
            log.error(f"{len(failed)} of {len(jobs)} jobs failed (the others completed):\n  " + "\n  ".join(failed))
        else:
            log.info(f"all {len(jobs)} jobs completed")
        return returns


    def _run_packed(self, executor, params: list[tuple], slots: list[int | None]) -> list:
        """Submit the jobs one by one into ``slots``: a job starts when one frees (polled), a packed
        GPU slot's job sees that GPU only. Returns the jobs in the order of ``params``."""
        import time

        jobs: list[Any] = [None] * len(params)
        running: dict[int, Any] = {}  # slot -> job
        queue = list(range(len(params)))
        while queue or running:
            for slot, job in list(running.items()):
                if job.done():
                    del running[slot]
            for slot in [s for s in range(len(slots)) if s not in running]:
                if not queue:
                    break
                i = queue.pop(0)
                gpu = slots[slot]
                if gpu is not None:
                    # submitit's AutoExecutor does not pass visible_gpus on; its LocalExecutor takes it
                    executor._executor.update_parameters(gpus_per_node=1, visible_gpus=(gpu,))
                jobs[i] = running[slot] = executor.submit(self, *params[i])
                log.info(f"\tstarted #{params[i][2]} (job {jobs[i].job_id}" + (f", GPU {gpu})" if gpu is not None
                                                                                 else ")"))
            if queue or running:
                time.sleep(0.5)
        return jobs


if plugin is not None:
    # The annotations are objects, not strings: Hydra executes this module without registering it in
    # sys.modules, where dataclass looks string annotations up (``from __future__ import annotations``)
    PackedLocalQueueConf = make_dataclass(
        "PackedLocalQueueConf", [("max_parallel", Optional[int], None), ("jobs_per_gpu", Optional[int], None),
                                 ("gpus", Optional[List[int]], None), ("job_threads", Any, "auto")],
        bases=(LocalQueueConf,))
    PackedLocalQueueConf.__doc__ = "``hydra/launcher=local``'s keys: the plugin's and the packing keys (module docstring)."

    ConfigStore.instance().store(group="hydra/launcher", name="maskmtl_local", node=PackedLocalQueueConf(),
                                 provider="maskmtl")

    class SlurmLauncher(_GatheringLauncher):  # type: ignore[no-redef]
        _EXECUTOR = "slurm"

    class LocalLauncher(_GatheringLauncher):  # type: ignore[no-redef]
        _EXECUTOR = "local"
