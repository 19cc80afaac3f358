"""`python -m nycdata export-config` writes a config `terratorch fit` accepts, equivalent to notebook 03."""

import pytest
import yaml
from terratorch.cli_tools import build_lightning_cli

from nycdata.__main__ import main
from nycdata.data.dataset import NYCDataModule
from nycdata.data.fixture import FixtureConfig, make_fixture
from nycdata.model.variants import get_variant
from nycdata.params import PARAMS_DIR, load_params
from nycdata.study.config import task_kwargs
from nycdata.study.export import lightning_config
from nycdata.study.train import NYCSegmentationTask, make_trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("cli") / "fx", FixtureConfig(chips=9, size=32, timesteps=2, seed=2))


def _export(tmp_path, data_dir, variant, capsys):
    args = ["export-config", "-f", str(PARAMS_DIR / "fixture.yaml"), "-p", "variant", variant,
            "-p", "data_root", str(data_dir), "-p", "output_root", str(tmp_path / "out"), "-p", "cv_folds", "0"]
    assert main(args) == 0
    path = tmp_path / f"{variant}.yaml"
    path.write_text(capsys.readouterr().out)
    return path


@pytest.mark.parametrize("variant", ["baseline", "tim"])
def test_terratorch_fit_accepts_the_exported_config(tmp_path, data_dir, variant, capsys):
    config = _export(tmp_path, data_dir, variant, capsys)
    exported = yaml.safe_load(config.read_text())
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={"variant": variant, "data_root": str(data_dir), "cv_folds": 0})
    assert exported["model"]["init_args"] == task_kwargs(params, get_variant(variant)), "same task as notebook 03"
    assert exported["data"]["init_args"]["modalities"] == list(get_variant(variant).modalities)
    # terratorch's own CLI entry point (what `terratorch fit` runs), in-process to save a second terratorch import
    cli = build_lightning_cli(args=["fit", "--config", str(config), "--trainer.fast_dev_run=true",
                                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert isinstance(cli.model, NYCSegmentationTask) and isinstance(cli.datamodule, NYCDataModule)


def test_fine_tunes_trainer_is_the_exported_trainer(tmp_path, data_dir):
    """make_trainer instantiates the trainer section export-config prints (same arguments, callbacks, settings)."""
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "variant": "tim", "data_root": str(data_dir), "cv_folds": 0, "max_epochs": 3, "early_stopping_patience": 2})
    exported = lightning_config(params)["trainer"]
    run_dir = tmp_path / "cell"
    trainer = make_trainer(params, run_dir, log=lambda m: None)
    assert trainer.max_epochs == exported["max_epochs"] == 3 and trainer.log_every_n_steps == exported["log_every_n_steps"]
    assert trainer.progress_bar_callback is None and not exported["enable_progress_bar"]
    configured = [spec["class_path"].rsplit(".", 1)[1] for spec in exported["callbacks"]]
    built = {type(c).__name__: c for c in trainer.callbacks}  # Lightning moves checkpointing last
    assert configured == ["ModelCheckpoint", "ModelCheckpoint", "EarlyStopping", "BatchSeeds"] and set(configured) <= set(built)
    best, last = [c for c in trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    stopper = built["EarlyStopping"]
    assert (stopper.patience, stopper.monitor) == (exported["callbacks"][2]["init_args"]["patience"], "val/loss") == (2, "val/loss")
    assert best.dirpath == last.dirpath == str(run_dir / "checkpoints")
    assert (best.monitor, best.save_weights_only, last.monitor, last.save_weights_only) == ("val/loss", True, None, False)
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert exported["callbacks"][0]["init_args"]["dirpath"].endswith("-cli/checkpoints"), "the CLI writes beside, not over"
