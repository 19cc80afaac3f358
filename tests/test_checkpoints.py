"""Checkpoints: a finished cell keeps weights only, a kill cannot leave half a file, a corrupt last.ckpt restarts the
cell instead of stopping the grid; two-process DDP on CPU (gloo) finishes with a complete metrics file."""

import pandas as pd
import pytest
import torch

from nycdata.data.fixture import FixtureConfig, make_fixture
from nycdata.params import PARAMS_DIR, load_params
from nycdata.runs import RunLayout
from nycdata.study.checkpoints import AtomicCheckpointIO, unreadable
from nycdata.study.train import NYCSegmentationTask, fine_tune, read_epoch_metrics

from test_train import Interrupt, InterruptAfterFirstEpoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("ckpt") / "data", FixtureConfig(chips=8, size=32, timesteps=2, seed=3))


@pytest.fixture
def params(tmp_path, data_dir):
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data_dir), "output_root": str(tmp_path / "out"), "run_name": "r", "max_epochs": 2, "cv_folds": 0})


def test_a_finished_cell_keeps_best_weights_without_optimizer_state_and_no_last_checkpoint(params):
    fine_tune(params, log=lambda m: None)
    cell = RunLayout.of(params).cell_of(params)
    assert not cell.last_checkpoint.exists(), "a finished cell cannot resume: last.ckpt (optimizer state) is gone"
    best = torch.load(cell.best_checkpoint, map_location="cpu", weights_only=False)
    assert "state_dict" in best and "optimizer_states" not in best and "lr_schedulers" not in best
    assert sorted(p.name for p in cell.checkpoints.iterdir()) == ["best.ckpt"]
    model = NYCSegmentationTask.load_from_checkpoint(cell.best_checkpoint, map_location="cpu")  # what 04 loads
    assert model.hparams["model_args"]["backbone"].startswith("terramind_v1_tiny")


def test_a_corrupt_last_checkpoint_is_set_aside_and_the_cell_restarts_from_scratch(params):
    whole = fine_tune({**params, "run_name": "whole"}, log=lambda m: None)
    run = RunLayout.of(params)
    cell = run.cell_of(params)
    with pytest.raises(Interrupt):
        fine_tune(params, log=lambda m: None, callbacks=[InterruptAfterFirstEpoch()])
    size = cell.last_checkpoint.stat().st_size
    with open(cell.last_checkpoint, "r+b") as f:  # killed mid-write by a writer that was not atomic; or disk full
        f.truncate(size // 2)
    assert "PytorchStreamReader" in unreadable(cell.last_checkpoint)

    lines = []
    with pytest.warns(UserWarning, match=r"last\.ckpt cannot resume this cell .*moved to .*set_aside"):
        summary = fine_tune({**params, "resume": True}, log=lines.append)
    assert any(str(cell.last_checkpoint) in line and "restarts from scratch" in line for line in lines)
    aside = list((run.set_aside / "baseline" / "seed42").iterdir())
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").stat().st_size == size // 2
    assert summary["epochs_run"] == 2 and summary["best_val"] == whole["best_val"], "from scratch = a fresh run"
    assert (read_epoch_metrics(cell.root)["epoch"].tolist()) == [0, 1], "no epochs of the abandoned leg"


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert unreadable(path) is None and torch.load(path, weights_only=False)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no partial file left behind"


def test_two_process_ddp_on_cpu_finishes_with_a_complete_metrics_file(params):
    ddp = {**params, "devices": 2, "strategy": "ddp_fork", "accelerator": "cpu", "run_name": "ddp"}
    summary = fine_tune(ddp, log=lambda m: None)
    cell = RunLayout.of(ddp).cell_of(ddp)
    epochs = read_epoch_metrics(cell.root)
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2 and epochs["epoch"].tolist() == [0, 1]
    assert epochs[["train/loss", "val/loss", "val/mIoU"]].notna().all().all(), "every epoch trained and validated"
    raw = pd.read_csv(cell.metrics)
    assert (raw.groupby("epoch")["val/loss"].count() == 1).all(), "rank 0 alone writes metrics"
    assert cell.best_checkpoint.is_file() and not cell.last_checkpoint.exists()


def test_tim_checkpoints_leave_out_the_frozen_generator_and_load_it_back_from_the_build(params):
    tim = {**params, "variant": "tim", "run_name": "tim", "max_epochs": 1}
    fine_tune(tim, log=lambda m: None)
    cell = RunLayout.of(tim).cell_of(tim)
    saved = torch.load(cell.best_checkpoint, map_location="cpu", weights_only=False)
    assert saved["frozen_generator_tensors_left_out"] > 0
    assert not any(".sampler." in key for key in saved["state_dict"]), "no generator tensor on disk"
    loaded = NYCSegmentationTask.load_from_checkpoint(cell.best_checkpoint, map_location="cpu")
    generator = {k: v for k, v in loaded.state_dict().items() if ".sampler." in k}
    assert len(generator) == saved["frozen_generator_tensors_left_out"]
    fresh = NYCSegmentationTask(**{k: v for k, v in loaded.hparams.items()}).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in generator.items()), "the build's own generator, as in training"
    trained = {k: v for k, v in saved["state_dict"].items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items()), "the fine-tuned weights, as saved"


def test_bf16_best_weights_give_a_bf16_mixed_model_the_same_outputs_from_half_the_bytes(params):
    from nycdata.model.variants import get_variant
    from nycdata.study.train import build_task, store_autocast_weights_in_bf16

    model = build_task(params, get_variant("baseline")).eval()
    for p in model.parameters():  # weights that are not already bf16-representable
        p.data.add_(torch.randn_like(p) * 1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert store_autocast_weights_in_bf16(model, state) > 0
    assert sum(v.numel() * v.element_size() for v in state.values()) < 0.6 * fp32_bytes
    x = {m: torch.randn(2, 12 if m == "S2L2A" else 2 if m == "S1RTC" else 1, 2, 32, 32) for m in ("S2L2A", "S1RTC", "DEM")}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model.model(dict(x)).output
        model.load_state_dict(state)  # copied back into the fp32 parameters
        after = model.model(dict(x)).output
    assert torch.equal(before, after)
