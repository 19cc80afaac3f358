"""One training configuration, built once from params: what ``fine_tune`` (notebook 03) runs and what
``python -m nycdata export-config`` prints for ``terratorch fit --config``.

It is written in LightningCLI's shape (``trainer``, ``data``, ``model``; every object as ``class_path`` +
``init_args``): ``export-config`` dumps it as YAML; ``fine_tune`` instantiates its trainer part with
:func:`instantiate` and builds its task from the same :func:`task_kwargs`. The differences are on purpose and
named in :func:`nycdata.study.train.make_trainer`: fine_tune's CSV logger appends when a run resumes, and it adds
a plain per-epoch log line and, in JupyterLab only, a progress widget (Lightning's own bar stays off).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX
from nycdata.data.dataset import split_kwargs
from nycdata.data.thoughts import generated_root
from nycdata.model.variants import Variant, get_variant, variant_model_args
from nycdata.params import resolve_path
from nycdata.runs import CellLayout

MONITOR = "val/loss"
TASK_CLASS = "nycdata.study.train.NYCSegmentationTask"
BATCH_SEEDS_CLASS = "nycdata.study.train.BatchSeeds"
ATOMIC_CHECKPOINTS_CLASS = "nycdata.study.checkpoints.AtomicCheckpointIO"


def task_kwargs(params: Mapping, variant: Variant) -> dict:
    """Arguments of the task: the original study's loss, optimiser and scheduler, and how TiM's arms are matched."""
    return dict(
        model_args=variant_model_args(params, variant), model_factory="EncoderDecoderFactory",
        loss="ce", ignore_index=IGNORE_INDEX, class_names=list(CLASS_NAMES),
        # fused AdamW: one kernel over all tensors instead of a loop of elementwise ops per tensor (the same update up
        # to rounding; measured on CPU for terramind_v1_base's 168 M trainable parameters: 662 -> 103 ms per step)
        lr=float(params["lr"]), optimizer="AdamW",
        optimizer_hparams={"weight_decay": float(params["weight_decay"]), "fused": True},
        scheduler="ReduceLROnPlateau",
        scheduler_hparams={"factor": float(params["lr_factor"]), "patience": params["lr_patience"]},
        freeze_backbone=False, plot_on_val=False, cached_thoughts=variant.cached, thought_seed=int(params["thought_seed"]),
        share_generator_embeddings=bool(params["tim_share_embeddings"]),
        frozen_input_embeddings=variant.frozen_embeddings or (variant.is_tim and bool(params["tim_share_embeddings"])),
        random_generator=variant.is_tim and bool(params["tim_random_generator"]),
    )


def trainer_config(params: Mapping, run_dir: str | Path) -> dict:
    """The Lightning Trainer's arguments, callbacks and logger for one cell writing into ``run_dir``."""
    cell = CellLayout(Path(run_dir))
    run_dir = str(run_dir)
    return {
        "accelerator": params["accelerator"], "devices": params["devices"], "strategy": params["strategy"],
        "precision": params["precision"], "max_epochs": params["max_epochs"], "default_root_dir": run_dir,
        "log_every_n_steps": 1, "deterministic": params["deterministic"], "enable_progress_bar": False,
        "enable_model_summary": False,
        "plugins": [{"class_path": ATOMIC_CHECKPOINTS_CLASS}],  # a kill cannot leave half a checkpoint
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": run_dir, "name": "", "version": ""}},
        "callbacks": [
            # best.ckpt: weights only, what evaluation and publishing load; last.ckpt: the full state to resume from
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(cell.checkpoints), "filename": cell.best_checkpoint.stem, "monitor": MONITOR,
                           "mode": "min", "save_top_k": 1, "save_weights_only": True, "enable_version_counter": False}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # no monitor: the latest epoch, overwritten
             "init_args": {"dirpath": str(cell.checkpoints), "filename": cell.last_checkpoint.stem, "save_top_k": 1,
                           "enable_version_counter": False}},
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
             "init_args": {"monitor": MONITOR, "mode": "min", "patience": params["early_stopping_patience"]}},
            {"class_path": BATCH_SEEDS_CLASS, "init_args": {"seed": params["seed"]}},
        ],
    }


def data_config(params: Mapping, variant: Variant) -> dict:
    init_args = {"data_root": str(resolve_path(params["data_root"])), "modalities": list(variant.modalities),
                 "batch_size": params["batch_size"], "num_workers": params["num_workers"], "augment": params["augment"],
                 "normalization": params["normalization"], "seed": params["seed"], **split_kwargs(params)}
    if variant.generated:  # tim_input reads the LULC that a run (or notebook 03) generated into the run folder
        init_args["generated_root"] = str(generated_root(params))
    return {"class_path": "nycdata.data.dataset.NYCDataModule", "init_args": init_args}


def training_config(params: Mapping, run_dir: str | Path) -> dict:
    """The whole configuration of one cell (``params['variant']``, seed, fold) in LightningCLI's shape."""
    variant = get_variant(params["variant"])
    return {"seed_everything": params["seed"], "trainer": trainer_config(params, run_dir),
            "data": data_config(params, variant),
            "model": {"class_path": TASK_CLASS, "init_args": task_kwargs(params, variant)}}


def instantiate(spec: Mapping[str, Any]) -> Any:
    """The object a ``{"class_path", "init_args"}`` entry describes (as LightningCLI would build it)."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
