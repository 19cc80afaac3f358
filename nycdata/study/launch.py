"""``python -m nycdata study --launcher local|slurm``: the study grid's fine-tunes as concurrent jobs, through submitit.

The grid (variants x seeds x folds, 75 fine-tunes for ``params/nyc.yaml``) is embarrassingly parallel; submitit
(the standard Python launcher for SLURM, with a local executor for one multi-GPU machine) runs it, and this module
only decides what each job runs and reports how it went:

- every unfinished cell is one job that executes notebook 03 for that cell (``resume=true``: an interrupted cell
  continues from its ``last.ckpt``), into the same ``notebooks/`` as the serial chain; finished cells are skipped,
  so rerunning the same command resubmits exactly the cells that failed;
- ``slurm`` submits one job array (``--max-parallel`` = array parallelism), ``--gpus-per-cell`` GPUs each;
- ``local`` runs at most ``--max-parallel`` cells at once on this machine, each pinned to its own GPU
  (``CUDA_VISIBLE_DEVICES``) or, without GPUs, to its share of the CPU cores;
- ``debug`` is the SLURM path run in this process by submitit's debug executor, to try a setup without a cluster;
- job logs go to ``<run>/logs/`` and ``<run>/logs/jobs.csv`` maps each cell to its job and log files; a failed
  cell is reported with its log path and stops the chain before 04/05, which run once, after the last cell.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nycdata.runs import RunLayout
from nycdata.study.notebooks import execute_notebook

LAUNCHERS = ("local", "slurm", "debug")


def run_cell(notebook: str, out_dir: str, parameters: dict, suffix: str, threads: int | None) -> str:
    """One job: execute ``notebook`` for one cell. ``threads`` caps the kernel's CPU threads (its share of cores)."""
    if threads:  # read by torch's OpenMP/MKL pools when the notebook's kernel starts
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return str(execute_notebook(notebook, Path(out_dir), parameters, suffix))


@dataclass(frozen=True)
class Launcher:
    """How the grid's cells are run: ``kind`` in :data:`LAUNCHERS`, at most ``max_parallel`` at once."""

    kind: str = "local"
    max_parallel: int = 1
    partition: str | None = None  # SLURM partition
    gpus_per_cell: int | None = None  # default: 1 under SLURM; locally 1 when CUDA is visible, else 0
    timeout_min: int = 24 * 60  # per cell; SLURM kills a job past it
    poll_s: float = 1.0  # how often running jobs are checked (SLURM: use tens of seconds)

    def __post_init__(self):
        if self.kind not in LAUNCHERS:
            raise ValueError(f"launcher {self.kind!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.max_parallel < 1:
            raise ValueError(f"--max-parallel {self.max_parallel}: need at least 1")

    def run_cells(self, params: Mapping, steps: Sequence, log: Callable[[str], None] = print) -> None:
        """Run the chain's 03 ``steps`` as jobs and wait for all; raise naming every failed cell and its log."""
        if not steps:
            return
        layout = RunLayout.of(params)
        layout.logs.mkdir(parents=True, exist_ok=True)
        calls = [("03_finetune", str(layout.notebooks), {**params, **step.parameters, "resume": True},
                  step.label[len("03_finetune"):], self._threads()) for step in steps]
        labels = [step.label for step in steps]
        log(f"launcher {self.kind}: {len(steps)} cells, at most {self.max_parallel} at once; logs in {layout.logs}")
        if self.kind == "local":
            outcome = self._run_local(layout, labels, calls, log)
        else:
            outcome = self._run_array(layout, labels, calls, log)
        failed = [f"  {label}: {error} (log: {stderr})" for label, (error, stderr) in outcome.items() if error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(steps)} cells failed; rerun the same command to resubmit "
                               "them (finished cells are skipped):\n" + "\n".join(failed))

    def executor(self, folder: Path, cluster: str | None = None):
        """The submitit executor for this launcher (``cluster`` overrides the kind: tests use ``debug``)."""
        import submitit

        try:
            executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster or self.kind)
        except RuntimeError as err:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
            raise RuntimeError(f"--launcher {self.kind}: {err} Submit from a SLURM login node, or use --launcher "
                               "local (this machine) or debug (the SLURM path, in this process).") from err
        gpus = self.gpus_per_cell
        if gpus is None:
            gpus = min(1, _local_gpus()) if self.kind == "local" else 1
        executor.update_parameters(timeout_min=self.timeout_min, gpus_per_node=gpus, tasks_per_node=1, name="nycdata-cell",
                                   slurm_array_parallelism=self.max_parallel,
                                   **({"slurm_partition": self.partition} if self.partition else {}))
        return executor

    def _threads(self) -> int | None:
        """Without GPUs, each of the ``max_parallel`` local cells gets an equal share of the cores."""
        if self.kind != "local" or _local_gpus():
            return None
        return max(1, (os.cpu_count() or 1) // self.max_parallel)

    def _run_array(self, layout: RunLayout, labels, calls, log) -> dict:
        executor = self.executor(layout.logs, "debug" if self.kind == "debug" else None)
        jobs = executor.map_array(run_cell, *zip(*calls))  # one SLURM job array
        _record_jobs(layout, labels, jobs)
        return _wait(dict(zip(labels, jobs)), self.poll_s, log)

    def _run_local(self, layout: RunLayout, labels, calls, log) -> dict:
        executor, gpus = self.executor(layout.logs), _local_gpus()
        pending, running, outcome = list(zip(labels, calls)), {}, {}
        while pending or running:
            while pending and len(running) < self.max_parallel:
                label, call = pending.pop(0)
                if gpus:  # pinned: the lowest GPU no running cell holds
                    busy = {slot for slot, _ in running.values()}
                    slot = min(set(range(gpus)) - busy)
                    executor.update_parameters(local_visible_gpus=(slot,), gpus_per_node=1)
                else:
                    slot = len(running)
                running[label] = (slot, executor.submit(run_cell, *call))
                _record_jobs(layout, [label], [running[label][1]])
                log(f"  {label}: started (job {running[label][1].job_id})")
            finished = _wait({label: job for label, (_, job) in running.items()}, self.poll_s, log, until_first=True)
            for label in finished:
                running.pop(label)
            outcome.update(finished)
        return outcome


def _local_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _wait(jobs: dict, poll_s: float, log, until_first: bool = False) -> dict:
    """Poll ``jobs`` (label -> submitit job); return ``{label: (error or None, stderr path)}`` of those that ended:
    all of them, or (``until_first``) at least one."""
    ended: dict = {}
    while len(ended) < len(jobs):
        for label, job in jobs.items():
            if label not in ended and job.done():
                error = job.exception()
                ended[label] = (_first_line(error), job.paths.stderr)
                minutes = (time.monotonic() - _SUBMITTED.get(job.job_id, time.monotonic())) / 60
                log(f"  {label}: {'FAILED' if error else 'done'} after {minutes:.1f} min" +
                    (f" ({_first_line(error)}; log {job.paths.stderr})" if error else ""))
        if ended and until_first:
            break
        if len(ended) < len(jobs):
            time.sleep(poll_s)
    return ended


def _first_line(error) -> str | None:
    """The last informative line of a job's error (submitit wraps the cell's traceback)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if "Error" in line or "error" in line]
    return (informative or lines or [type(error).__name__])[-1][:300]


_SUBMITTED: dict[str, float] = {}  # job id -> when it was submitted (monotonic), for the log's durations


def _record_jobs(layout: RunLayout, labels, jobs) -> None:
    """Append ``cell, job id, stdout, stderr`` rows to ``<run>/logs/jobs.csv``."""
    _SUBMITTED.update({job.job_id: time.monotonic() for job in jobs})
    path = layout.logs / "jobs.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["cell", "job_id", "stdout", "stderr", "submitted"])
        for label, job in zip(labels, jobs):
            writer.writerow([label, job.job_id, job.paths.stdout, job.paths.stderr, time.strftime("%Y-%m-%dT%H:%M:%S")])
