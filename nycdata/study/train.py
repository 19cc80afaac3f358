"""Fine-tuning one variant with one seed: terratorch's SemanticSegmentationTask under Lightning.

A run writes into :func:`cell_dir` (``output_root/run_name/<variant>/[fold<f>/]seed<k>/``): ``checkpoints/``
(``best.ckpt`` on val loss, ``last.ckpt``), ``metrics.csv`` (CSVLogger) and,
only when training finished, ``train_summary.json``. An existing run folder
is an error unless ``resume`` is true, which continues from ``last.ckpt``.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from terratorch.tasks import SemanticSegmentationTask

from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX
from nycdata.data.dataset import NYCDataModule, record_folds
from nycdata.io import write_json
from nycdata.model import terratorch_compat, thinking, weights
from nycdata.model.factory import backbone_built_outside_global_rng
from nycdata.model.generated import generate_lulc
from nycdata.model.terratorch_compat import appending_csv_logger
from nycdata.model.tim import (check_generator, freeze_input_embeddings, generator_tensor_count, isolate_thought_rng,
                               remember_tokenizer, share_random_generator, tokenizers_deferred,
                               untie_generator_embeddings, use_cached_thoughts)
from nycdata.model.variants import Variant, get_variant, variant_model_args
from nycdata.params import Params
from nycdata.runs import CellLayout, cell_dir
from nycdata.seeding import seed_everything
from nycdata.study.config import MONITOR, instantiate, task_kwargs, trainer_config
from nycdata.study.summaries import parameter_groups



class NYCSegmentationTask(SemanticSegmentationTask):
    """terratorch's task, with the arms of a comparison matched and TiM's frozen parts out of the optimizer.

    Built around terratorch's model: every variant with one seed gets the same decoder and head; TiM's generator
    keeps its own frozen copy of the embeddings (unless ``share_generator_embeddings``, upstream's setting) and
    thinks in its own random stream; its unused tokenizer is built only when thoughts are decoded. terratorch
    hands ``self.parameters()`` to the optimizer, so the frozen generator would sit in its param groups.
    """

    def __init__(self, *args, cached_thoughts: bool = False, thought_seed: int = 0,
                 share_generator_embeddings: bool = False, frozen_input_embeddings: bool = False,
                 random_generator: bool = False, **kwargs):
        # Lightning re-feeds every saved hyperparameter when loading a checkpoint, and terratorch records ``task``,
        # which its __init__ does not take. (The plain ``super().__init__(*args, **kwargs)`` lets the terratorch
        # CLI read the parent's signature.)
        kwargs.pop("task", None)
        # same decoder/head init in every variant with one seed; the tokenizer only when thoughts are decoded
        with backbone_built_outside_global_rng(), tokenizers_deferred() as deferred:
            super().__init__(*args, **kwargs)
        remember_tokenizer(self.model, deferred)
        self.hparams.update(cached_thoughts=cached_thoughts, thought_seed=thought_seed,
                            share_generator_embeddings=share_generator_embeddings,
                            frozen_input_embeddings=frozen_input_embeddings, random_generator=random_generator)
        share_random_generator(self.model, self.hparams["model_args"], force=random_generator)
        if cached_thoughts:
            use_cached_thoughts(self.model)  # drops the generator, and with it any sharing of embeddings
        if not share_generator_embeddings:
            untie_generator_embeddings(self.model)  # TiM's embeddings train like the baseline's (see its docstring)
        if frozen_input_embeddings:
            freeze_input_embeddings(self.model)
        if not cached_thoughts:
            isolate_thought_rng(self.model, thought_seed)  # after untying: it remembers the generator's device

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return terratorch_compat.optimizer_factory()(self.hparams["optimizer"], self.hparams["lr"], trainable, self.hparams["optimizer_hparams"],
                                 self.hparams["scheduler"], self.monitor, self.hparams["scheduler_hparams"])


def build_task(params: Mapping, variant: Variant) -> NYCSegmentationTask:
    """Build the task; for TiM, prove the generator holds TerraMind's weights (or was explicitly allowed not to).

    ``task.generator_report`` says what was checked: ``{"tensors", "verified", "source"}`` (None for a plain backbone).
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    weights.use_cache_dir(params)
    random_warning = check_generator(params, variant)
    try:
        task = NYCSegmentationTask(**task_kwargs(params, variant))
        thinks_with_checkpoint = variant.is_tim and not variant.cached and not params["tim_random_generator"]
        source = weights.generator_source(params) if thinks_with_checkpoint else None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as err:
        raise weights.offline_error(params, variant, err) from err
    task.generator_report = None
    if variant.cached:  # no generator in this model: nycdata.model.thinking verified it when caching
        task.generator_report = {"tensors": 0, "verified": 0, "source": "thought cache", "warning": random_warning}
    elif variant.is_tim:  # tim_input's generator is separate: nycdata.model.generated checks pretrained/allow flags
        verified = weights.verify_generator(task.model, source) if source else 0
        task.generator_report = {"tensors": generator_tensor_count(task.model), "verified": verified,
                                 "source": source or "random initialisation", "warning": random_warning}
    return task


class EpochLog(pl.Callback):
    """One plain line per epoch, for headless runs (no progress-bar widgets)."""

    def __init__(self, log: Callable[[str], None]):
        self.emit, self.started = log, time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.emit(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train/loss {m.get('train/loss', float('nan')):.4f} "
                 f"val/loss {m.get('val/loss', float('nan')):.4f} val/mIoU {m.get('val/mIoU', float('nan')):.4f} "
                 f"({time.monotonic() - self.started:.0f} s)")


def _appending_csv_logger(run_dir: Path):
    """Lightning's CSVLogger deletes an existing ``metrics.csv``; a resumed run must continue it instead (built on
    Lightning's private ExperimentWriter hooks, so it lives in nycdata.model.terratorch_compat)."""
    return appending_csv_logger(run_dir)


def variant_datamodule(params: Mapping, variant: Variant, log: Callable[[str], None] = print, **overrides):
    """The DataModule a variant reads: its own inputs, plus generated LULC for ``tim_input`` (generated on first use)
    or the thought cache of a ``*_cached`` variant (filled on first use), for the fold and seed of ``params``."""
    generated = cache = None
    if variant.generated:
        generated = str(generate_lulc(params, variant, log))
    if variant.cached:
        cache = str(cache_thoughts(params, variant, log))
    return NYCDataModule.from_params(params, modalities=list(variant.modalities), generated_root=generated,
                                     thought_cache=cache, **overrides)


def cache_thoughts(params: Mapping, variant: Variant, log: Callable[[str], None] = print):
    """The thought cache a ``*_cached`` variant reads: reused when finished under the same settings, else thought
    once by its online TiM twin (built and verified like any TiM model, then dropped)."""
    root = thinking.finished_cache(params, variant)
    if root is None:
        task = build_task(params, get_variant(variant.online))
        root = thinking.fill_thought_cache(task, params, variant, training_device(params), log)
        del task  # the generator is only needed for this pass
    return root


def training_device(params: Mapping) -> torch.device:
    """The device Lightning's ``accelerator`` resolves to (one device)."""
    wants_gpu = params["accelerator"] in ("gpu", "cuda") or (params["accelerator"] == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wants_gpu else "cpu")


def step_seed(seed: int, epoch: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, epoch, batch]).generate_state(1)[0])


class BatchSeeds(pl.Callback):
    """Reseed Python ``random``, numpy and torch (CPU and every GPU) from (seed, epoch, batch) before each training batch.

    The global RNG drives dropout and TiM's generation seeds. Lightning and the loaders also draw from it, at
    moments that differ between a fresh and a resumed run (iterator seeds, sanity check), so neither a saved RNG
    state nor one seed per epoch makes a run resumed from ``last.ckpt`` continue the uninterrupted one (measured:
    the first batch after resuming saw another RNG state). With one stream per batch every batch trains with the
    same draws either way, and every variant with one seed gets the same streams, so dropout matches across arms.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seed = step_seed(self.seed, trainer.current_epoch, batch_idx)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def make_trainer(params: Mapping, run_dir: Path, log: Callable[[str], None], callbacks=()) -> pl.Trainer:
    """The Trainer of :func:`nycdata.study.config.trainer_config` (what ``export-config`` prints), but with a CSV
    logger that appends when a run resumes and a plain line per epoch for headless logs."""
    config = trainer_config(params, run_dir)
    configured = [instantiate(spec) for spec in config.pop("callbacks")]
    config.pop("logger")
    return pl.Trainer(**config, logger=_appending_csv_logger(run_dir), callbacks=[*configured, EpochLog(log), *callbacks])


def fine_tune(params: Mapping, seed: int | None = None, resume: bool | None = None,
              log: Callable[[str], None] = print, callbacks=()) -> dict:
    """Fine-tune ``params['variant']`` on fold ``params['fold']`` with ``seed``; return (and write) the train summary."""
    cell = Params(params).replace(seed=params["seed"] if seed is None else seed)  # checked once, here
    variant = get_variant(cell["variant"])
    resume = cell["resume"] if resume is None else resume
    run_dir = cell_dir(cell)
    layout = CellLayout(run_dir)
    last = layout.last_checkpoint
    _check_run_dir(run_dir, resume, last)
    if layout.train_summary.is_file():
        log(f"{run_dir} already finished; nothing to resume")
        return json.loads(layout.train_summary.read_text())
    record_folds(cell)  # folds.csv, or an error when the run folder's folds were other ones
    datamodule = variant_datamodule(cell, variant, log)
    torch.backends.cudnn.benchmark = not cell["deterministic"]  # fixed input sizes: cuDNN picks its fastest kernels once
    seed_everything(cell["seed"])
    task = build_task(cell, variant)
    groups = parameter_groups(task.model)
    trainer = make_trainer(cell, run_dir, log, callbacks)
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if resume and last.is_file() else None)
    finally:  # an interrupted leg still counts towards the run's wall time
        _add_wall_time(run_dir, time.monotonic() - started)
    return _write_summary(run_dir, variant, cell, trainer, groups)


def _check_run_dir(run_dir: Path, resume: bool, last: Path) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not resume:
        raise FileExistsError(f"run folder {run_dir} already exists; pass resume=true to continue it from "
                              f"{last.relative_to(run_dir)}, or choose another run_name")
    if not last.is_file() and not CellLayout(run_dir).train_summary.is_file():
        raise FileNotFoundError(f"resume=true but {last} does not exist: the run stopped before its first epoch. "
                                f"Delete {run_dir} and start again.")


def _write_summary(run_dir: Path, variant: Variant, params: Mapping, trainer: pl.Trainer, groups) -> dict:
    epochs = read_epoch_metrics(run_dir)
    best = epochs.loc[epochs[MONITOR].idxmin()]
    summary = {
        "variant": variant.name, "seed": params["seed"], "fold": params["fold"] if params["cv_folds"] else None,
        "cv_folds": params["cv_folds"], "thought_seed": params["thought_seed"] if variant.is_tim else None,
        "tim_share_embeddings": params["tim_share_embeddings"] if variant.is_tim else None,
        "tim_random_generator": params["tim_random_generator"] if variant.is_tim else None,
        "deterministic": params["deterministic"],
        "epochs_run": int(epochs["epoch"].max()) + 1,
        "max_epochs": trainer.max_epochs, "stopped_early": bool(trainer.should_stop and trainer.current_epoch < trainer.max_epochs),
        "best_epoch": int(best["epoch"]), "best_val": {k: float(v) for k, v in best.items() if k.startswith("val/")},
        "wall_time_s": _add_wall_time(run_dir, 0.0),
        "parameters": groups.to_dict(orient="index"),
        "best_checkpoint": CellLayout(run_dir).best_checkpoint.relative_to(run_dir).as_posix(),
        "last_checkpoint": CellLayout(run_dir).last_checkpoint.relative_to(run_dir).as_posix(),
    }
    write_json(CellLayout(run_dir).train_summary, summary)
    return summary


def _add_wall_time(run_dir: Path, seconds: float) -> float:
    """Add one training leg's seconds to ``wall_time_s.txt``; return the total over all legs."""
    path = CellLayout(run_dir).wall_time
    total = (float(path.read_text()) if path.is_file() else 0.0) + seconds
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{total:.3f}\n")
    return total


def read_epoch_metrics(run_dir: Path) -> pd.DataFrame:
    """``metrics.csv`` folded to one row per epoch (Lightning logs train and val rows separately)."""
    frame = pd.read_csv(CellLayout(Path(run_dir)).metrics)
    return frame.groupby("epoch", as_index=False).last().drop(columns=["step"], errors="ignore")
