"""A LightningCLI config equivalent to what notebook 03 trains, for ``terratorch fit/test --config``.

The seed's reproduction path: ``terratorch fit --config config.yaml`` and
``terratorch test --config config.yaml --ckpt_path ...``. The config names
nycdata's DataModule and task classes, so the same data, model, loss,
optimiser, scheduler and callbacks are used. (The TiM generator-weight check
of ``nycdata.study.train.build_task`` does not run on this path.)
"""

from __future__ import annotations

from typing import Mapping

import yaml

from nycdata.data.dataset import split_kwargs
from nycdata.data.thoughts import generated_root
from nycdata.model.variants import get_variant
from nycdata.params import resolve_path
from nycdata.params import cell_dir
from nycdata.study.train import MONITOR, task_kwargs


def lightning_config(params: Mapping) -> dict:
    variant = get_variant(params["variant"])
    run_dir = str(cell_dir(params)) + "-cli"
    return {
        "seed_everything": params["seed"],
        "trainer": {
            "accelerator": params["accelerator"], "devices": params["devices"], "precision": params["precision"],
            "max_epochs": params["max_epochs"], "default_root_dir": run_dir, "log_every_n_steps": 1,
            "deterministic": params["deterministic"],
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": run_dir, "name": "", "version": ""}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": f"{run_dir}/checkpoints", "filename": "best", "monitor": MONITOR,
                               "mode": "min", "save_top_k": 1, "save_last": True}},
                {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                 "init_args": {"monitor": MONITOR, "mode": "min", "patience": params["early_stopping_patience"]}},
                {"class_path": "nycdata.study.train.BatchSeeds", "init_args": {"seed": params["seed"]}},
            ],
        },
        "data": {"class_path": "nycdata.data.dataset.NYCDataModule", "init_args": {
            "data_root": str(resolve_path(params["data_root"])), "modalities": list(variant.modalities),
            "batch_size": params["batch_size"], "num_workers": params["num_workers"], "augment": params["augment"],
            "normalization": params["normalization"], "seed": params["seed"], **split_kwargs(params),
            **_generated_input(params, variant)}},
        "model": {"class_path": "nycdata.study.train.NYCSegmentationTask", "init_args": task_kwargs(params, variant)},
    }


def _generated_input(params: Mapping, variant) -> dict:
    """tim_input reads LULC that `python -m nycdata run` (or notebook 03) generated into the run folder."""
    return {"generated_root": str(generated_root(params))} if variant.generated else {}


def config_yaml(params: Mapping) -> str:
    header = (f"# terratorch fit --config <this file>   (variant {params['variant']}, seed {params['seed']})\n"
              "# written by `python -m nycdata export-config`; equivalent to notebooks/03_finetune.ipynb\n")
    return header + yaml.safe_dump(lightning_config(params), sort_keys=False)
