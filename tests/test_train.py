"""Fine-tuning: resumed runs continue exactly; existing run folders are never overwritten; folds; matched arms."""

import hashlib

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from nycdata import console
from nycdata.data.chips import read_index
from nycdata.data.fixture import FixtureConfig, make_fixture
from nycdata.params import PARAMS_DIR, load_params
from nycdata.runs import cell_dir
from nycdata.study.train import fine_tune, read_epoch_metrics


class Interrupt(RuntimeError):
    pass


class InterruptAfterFirstEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # epoch 0 finished and checkpointed
            raise Interrupt("simulated crash after epoch 1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Read-only chips for the module: 4 chips in 3 parents, seed 0 puts the 2-chip parent in train (val and test: 1)."""
    data = make_fixture(tmp_path_factory.mktemp("train") / "data", FixtureConfig(chips=4, size=32, timesteps=2, seed=0))
    assert read_index(data).groupby("split").size().to_dict() == {"train": 2, "val": 1, "test": 1}
    return data


def _params(data, out, run_name):
    # batch_size 1: the 2 training chips make 2 batches an epoch
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data), "output_root": str(out), "run_name": run_name, "max_epochs": 2, "cv_folds": 0,
        "batch_size": 1, "thought_cache_samples": 2})


@pytest.fixture
def params(data, tmp_path):
    return _params(data, tmp_path / "out", "r")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """One uninterrupted 2-epoch baseline run under ``params`` (its own output_root), recording every training batch:
    the reference of the resumed run and of the TiM arms. Read it, never change it."""
    params = _params(data, tmp_path_factory.mktemp("whole") / "out", "whole")
    recorder = RecordBatches()
    summary = fine_tune({**params, "variant": "baseline"}, log=lambda m: None, callbacks=[recorder])
    return {"summary": summary, "batches": recorder.rows, "run_dir": cell_dir({**params, "variant": "baseline"})}


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _metric_values(run_dir):
    return read_epoch_metrics(run_dir).drop(columns=["lr-AdamW"], errors="ignore").set_index("epoch").sort_index(axis=1)


def test_interrupted_run_resumes_exactly_where_an_uninterrupted_run_would_be(params, uninterrupted):
    run_dir = cell_dir({**params, "variant": "baseline"})
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
    raw = pd.read_csv(run_dir / "metrics.csv")
    assert raw["epoch"].is_monotonic_increasing
    assert (raw.groupby("epoch")["val/loss"].count() == 1).all(), "each epoch validated once"
    pd.testing.assert_frame_equal(_metric_values(run_dir), _metric_values(uninterrupted["run_dir"]))  # exact, every metric of every epoch
    assert summary["best_val"] == uninterrupted["summary"]["best_val"]

    again = fine_tune({**params, "resume": True}, log=lambda m: None)
    assert again == summary, "resuming a finished run changes nothing"


def test_unknown_variant_lists_the_valid_ones(params):
    with pytest.raises(ValueError, match="valid variants: baseline, tim"):
        fine_tune({**params, "variant": "timm"})


def test_tim_with_random_generator_needs_explicit_permission(params):
    with pytest.raises(ValueError, match="allow_random_generator"):
        fine_tune({**params, "variant": "tim", "allow_random_generator": False})


def test_the_original_configuration_fine_tunes_on_the_fixture(params):
    """params/original.yaml under the fixture's tiny settings: TiM with its random generator, frozen embeddings."""
    original = load_params(PARAMS_DIR / "original.yaml", PARAMS_DIR / "fixture.yaml", overrides={
        k: params[k] for k in ("data_root", "output_root", "run_name", "cv_folds")} | {"max_epochs": 1})
    console.forget_warnings()  # shown once per process: another test may have shown it already
    with pytest.warns(UserWarning, match="RANDOM generator on purpose"):
        summary = fine_tune({**original, "variant": "tim"})
    assert summary["tim_random_generator"] is True and summary["tim_share_embeddings"] is True
    assert summary["parameters"]["input embeddings"]["trainable"] == 0 and summary["epochs_run"] == 1


def _rng_digest():
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


class RecordBatches(pl.Callback):
    """Per training batch: chips, a digest of the (augmented) masks, and of the global RNG state before and after
    the step (the same after means the forward drew the same random numbers: dropout, and nothing else)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        masks = hashlib.sha256(batch["mask"].numpy().tobytes()).hexdigest()
        self.rows.append([trainer.current_epoch, tuple(batch["filename"]), masks, _rng_digest()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1].append(_rng_digest())


def test_baseline_tim_and_tim_cached_see_the_same_batches_transforms_and_dropout(params, uninterrupted):
    # the baseline arm: the module's uninterrupted run, under the same params but for output_root and run_name
    sequences, groups = {"baseline": uninterrupted["batches"]}, {"baseline": uninterrupted["summary"]["parameters"]}
    for variant in ("tim", "tim_cached"):
        recorder = RecordBatches()
        groups[variant] = fine_tune({**params, "variant": variant}, log=lambda m: None, callbacks=[recorder])["parameters"]
        sequences[variant] = recorder.rows
    assert groups["baseline"]["input embeddings"]["trainable"] > 0
    for variant in ("tim", "tim_cached"):
        assert groups[variant]["input embeddings"] == groups["baseline"]["input embeddings"], "TiM trains its input embeddings"
        assert groups[variant]["thought embedding"]["trainable"] > 0 and groups[variant]["generator"]["trainable"] == 0
    assert len(sequences["baseline"]) >= 4 and len({r[2] for r in sequences["baseline"]}) > 1
    assert sequences["tim"] == sequences["baseline"] == sequences["tim_cached"]


def test_cross_validation_cells_have_their_own_folders_and_test_parents(data, tmp_path):
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data), "output_root": str(tmp_path / "out"), "run_name": "cv", "max_epochs": 1, "cv_folds": 3,
        "fold": 2})
    summary = fine_tune(params, log=lambda m: None)
    folder = tmp_path / "out" / "cv" / "baseline" / "fold2" / "seed42"
    assert cell_dir(params) == folder and (folder / "train_summary.json").is_file()
    assert summary["fold"] == 2 and summary["cv_folds"] == 3
    folds = pd.read_csv(tmp_path / "out" / "cv" / "folds.csv")
    assert sorted(folds.loc[folds.split == "test", "fold"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="folds.csv holds other folds"):
        fine_tune({**params, "split_seed": 7, "fold": 0}, log=lambda m: None)
