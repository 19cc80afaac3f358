"""The study grid through submitit: local cells run concurrently, a killed cell is reported with its log and resumes
on the next run, and the comparison equals the serial chain's; the SLURM path submits one job array."""

import json
import shutil
import stat

import pytest

from nycdata.params import load_params
from nycdata.runs import RunLayout
from nycdata.study.chain import run_pipeline
from nycdata.study.launch import Launcher
from nycdata.study.train import KILL_ENV, read_epoch_metrics


def _launched_params(run):
    serial = load_params(run / "params.yaml")
    return serial.replace(run_name="launched")


def _copy_head(serial_root, launched_root):
    """01 and 02 as the serial run made them (the launcher is about the grid; the chain skips finished steps)."""
    (launched_root / "notebooks").mkdir(parents=True)
    for name in ("data_summary.json", "folds.csv", "s2_medians.csv", "smoke.json"):
        shutil.copy2(serial_root / name, launched_root / name)
    for notebook in (serial_root / "notebooks").glob("0[12]_*.ipynb"):
        shutil.copy2(notebook, launched_root / "notebooks" / notebook.name)


def test_local_launcher_runs_cells_concurrently_resumes_a_killed_cell_and_matches_the_serial_chain(run, monkeypatch,
                                                                                                 shared_kernel):
    params = _launched_params(run)
    layout = RunLayout.of(params)
    _copy_head(run, layout.root)
    victim = layout.cell("tim", 42, 1)
    monkeypatch.setenv(KILL_ENV, f"{victim.root}:1")  # SIGKILL as its second epoch starts
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, as in the serial chain (conftest.py)
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # each of 2 local cells gets 2 // 2 = 1 thread, on any machine
    lines = []
    with pytest.raises(RuntimeError, match=r"1 of 4 cells failed.*\n  03_finetune_tim_seed42_fold1: .*log: .*logs/"):
        run_pipeline(params, resume=True, launcher=Launcher("local", max_parallel=2, poll_s=0.2), log=lines.append)
    started = [i for i, line in enumerate(lines) if line.endswith(")") and ": started (job" in line]
    ended = [i for i, line in enumerate(lines) if ": done after" in line or ": FAILED after" in line]
    assert len(started) == 4 and len(ended) == 4 and started[1] < ended[0], "two cells ran at once"
    assert victim.last_checkpoint.is_file() and not victim.train_summary.exists(), "killed after epoch 1"
    assert not layout.comparison.exists(), "04 waits for the last cell"
    jobs = (layout.logs / "jobs.csv").read_text()
    assert "03_finetune_tim_seed42_fold1" in jobs and jobs.count("\n") == 5

    monkeypatch.delenv(KILL_ENV)
    lines = []
    run_pipeline(params, resume=True, launcher=Launcher("debug", max_parallel=2), log=lines.append,  # the SLURM path
                 kernel=shared_kernel)  # for 04 and 05
    assert any("3 already done, 1 launched" in line for line in lines), "finished cells are skipped"
    assert not layout.set_aside.exists(), "the killed cell resumed from its last.ckpt, it did not restart"
    assert read_epoch_metrics(victim.root)["epoch"].tolist() == [0, 1]
    assert json.loads(layout.comparison.read_text()) == json.loads((run / "comparison.json").read_text())


def test_slurm_launcher_submits_one_job_array_with_the_partition_and_gpus(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    executor = Launcher("slurm", max_parallel=2, partition="gpu", gpus_per_cell=1).executor(tmp_path / "logs")
    jobs = executor.map_array(len, ["a", "bb", "ccc"])
    script = (tmp_path / "submitted.sh").read_text()
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1", "4242_2"]
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1"):
        assert line in script
    assert f"{tmp_path}/logs/%A_%a" in script or f"{tmp_path}/logs/%j" in script


def test_launcher_refuses_an_unknown_kind_and_a_missing_slurm_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="choose one of local, slurm, debug"):
        Launcher("sge")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="--launcher slurm: .*srun.*--launcher local"):
        Launcher("slurm").executor(tmp_path)
