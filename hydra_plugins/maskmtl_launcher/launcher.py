"""Hydra launchers for sweeps on SLURM (``hydra/launcher=slurm``) and in local processes
(``hydra/launcher=local``), built on hydra-submitit-launcher.

They differ from the plugin's own launchers in one way: the plugin returns at the first failed job
(``[j.results()[0] for j in jobs]``); these wait for every job of the array, then print one line per
failed job with its overrides and log files, so one failure neither hides the others nor stops
gathering their results. The jobs themselves are independent SLURM array tasks either way.

Requeue: on SLURM's preemption/timeout signal submitit calls the launcher's ``checkpoint`` (inherited:
resubmit the same job with the same overrides, hence the same run directory) and requeues the job;
the recipe's loop saves a checkpoint first (``recipes.common.Preemption``) and the requeued job
resumes from it (``recipes.common.resume_point``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
except ImportError as e:  # Hydra imports every plugin module at start-up: fail only when chosen
    _missing = e

    class SlurmLauncher:  # noqa: D101
        def __init__(self, **_: Any) -> None:
            raise ImportError(f"hydra/launcher=slurm|local needs hydra-submitit-launcher and submitit "
                              f"(pip install -e '.[slurm]'): {_missing}")

    LocalLauncher = SlurmLauncher
    plugin = None


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
        init_params = {"folder": self.params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in init_keys | {"submitit_folder"}})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"submitit '{self._EXECUTOR}' sweep of {len(job_overrides)} jobs into {sweep_dir}")
        params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
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


if plugin is not None:
    class SlurmLauncher(_GatheringLauncher):  # type: ignore[no-redef]
        _EXECUTOR = "slurm"

    class LocalLauncher(_GatheringLauncher):  # type: ignore[no-redef]
        _EXECUTOR = "local"
