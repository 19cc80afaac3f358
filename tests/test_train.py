"""Fine-tuning: interrupted runs resume to the configured epoch count; existing run folders are never overwritten."""

import lightning.pytorch as pl
import pandas as pd
import pytest

from nycdata.fixture import FixtureConfig, make_fixture
from nycdata.params import PARAMS_DIR, load_params
from nycdata.train import fine_tune, read_epoch_metrics, seed_run_dir


class Interrupt(RuntimeError):
    pass


class InterruptAfterFirstEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # epoch 0 finished and checkpointed
            raise Interrupt("simulated crash after epoch 1")


@pytest.fixture
def params(tmp_path):
    data = make_fixture(tmp_path / "data", FixtureConfig(chips=9, size=32, timesteps=2, seed=5))
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data), "output_root": str(tmp_path / "out"), "run_name": "r", "max_epochs": 2})


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_interrupted_run_resumes_with_one_continuous_metrics_file(params):
    run_dir = seed_run_dir(params, "baseline", params["seed"])
    with pytest.raises(Interrupt):
        fine_tune(params, log=lambda m: None, callbacks=[InterruptAfterFirstEpoch()])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "train_summary.json").exists()
    first_leg_s = float((run_dir / "wall_time_s.txt").read_text())

    before = _snapshot(run_dir)
    with pytest.raises(FileExistsError, match="resume=true"):
        fine_tune(params, log=lambda m: None)
    assert _snapshot(run_dir) == before, "a refused run must leave the folder untouched"

    summary = fine_tune({**params, "resume": True}, log=lambda m: None)
    assert summary["epochs_run"] == 2
    assert summary["wall_time_s"] > first_leg_s > 0, "wall time adds up over both legs"
    epochs = read_epoch_metrics(run_dir)
    assert epochs["epoch"].tolist() == [0, 1] and epochs["val/loss"].notna().all()
    raw = pd.read_csv(run_dir / "metrics.csv")
    assert raw["epoch"].is_monotonic_increasing
    assert (raw.groupby("epoch")["val/loss"].count() == 1).all(), "each epoch validated once"

    again = fine_tune({**params, "resume": True}, log=lambda m: None)
    assert again == summary, "resuming a finished run changes nothing"


def test_unknown_variant_lists_the_valid_ones(params):
    with pytest.raises(ValueError, match="valid variants: baseline, tim"):
        fine_tune({**params, "variant": "timm"})


def test_tim_with_random_generator_needs_explicit_permission(params):
    with pytest.raises(ValueError, match="allow_random_generator"):
        fine_tune({**params, "variant": "tim", "allow_random_generator": False})
