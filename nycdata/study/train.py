"""Fine-tuning one variant with one seed: terratorch's SemanticSegmentationTask under Lightning.

A run writes into its cell folder (``output_root/run_name/<variant>/[fold<f>/]seed<k>/``): ``checkpoints/``
(``best.ckpt``: weights on the best val loss; ``last.ckpt``: the full state, only until the cell finishes),
``metrics.csv`` (CSVLogger) and, only when training finished, ``train_summary.json``. An existing run folder is an
error unless ``resume`` is true, which continues from ``last.ckpt`` (one that cannot be read is set aside and the
cell starts again: :mod:`nycdata.study.checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from terratorch.tasks import SemanticSegmentationTask

from nycdata import console
from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX
from nycdata.data.dataset import NYCDataModule, record_folds
from nycdata.io import write_json
from nycdata.model import terratorch_compat, thinking, weights
from nycdata.model.factory import backbone_built_outside_global_rng
from nycdata.model.generated import generate_lulc
from nycdata.model.terratorch_compat import appending_csv_logger
from nycdata.model.tim import (check_generator, freeze_input_embeddings, frozen_generator_keys, generator_tensor_count,
                               isolate_thought_rng, remember_tokenizer, share_random_generator, tokenizers_deferred,
                               untie_generator_embeddings, use_cached_thoughts)
from nycdata.model.variants import Variant, get_variant, variant_model_args
from nycdata.params import Params
from nycdata.runs import CellLayout, RunLayout
from nycdata.study import checkpoints
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the frozen generator is rebuilt identically with the model: leaving it out keeps a base TiM cell's
        # checkpoints at the baseline's size (the study's disk: nycdata.study.gpu_check)
        dropped = frozen_generator_keys(self)
        for key in dropped:
            checkpoint["state_dict"].pop(key, None)
        checkpoint["frozen_generator_tensors_left_out"] = len(dropped)
        if "optimizer_states" not in checkpoint and str(self.trainer.precision).startswith("bf16"):  # best.ckpt
            checkpoint["bf16_tensors"] = store_autocast_weights_in_bf16(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("frozen_generator_tensors_left_out"):  # this build's own generator fills them back
            own = self.state_dict()
            for key in frozen_generator_keys(self):
                checkpoint["state_dict"].setdefault(key, own[key])

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return terratorch_compat.optimizer_factory()(self.hparams["optimizer"], self.hparams["lr"], trainable, self.hparams["optimizer_hparams"],
                                 self.hparams["scheduler"], self.monitor, self.hparams["scheduler_hparams"])


def store_autocast_weights_in_bf16(model: torch.nn.Module, state_dict: dict) -> int:
    """Round the weights and biases of ``model``'s linear and convolution layers in ``state_dict`` to bf16; return
    how many. Under bf16 autocast these layers read exactly these bf16 values (autocast rounds the same way, and
    rounding twice changes nothing), so a bf16-mixed model evaluates identically from the halved file: it keeps the
    study's best checkpoints (75 cells at base) within a GPU box's disk. Norms, embeddings and buffers stay fp32."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)
    keys = [f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, layers)
            for p in ("weight", "bias") if getattr(module, p, None) is not None]
    rounded = [key for key in keys if key in state_dict and state_dict[key].dtype == torch.float32]
    for key in rounded:
        state_dict[key] = state_dict[key].to(torch.bfloat16)
    return len(rounded)


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


def step_seed(seed: int, epoch: int, batch: int, validation: bool = False) -> int:
    entropy = [seed % 2**32, epoch, batch] + ([1] if validation else [])  # training keeps its original streams
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class BatchSeeds(pl.Callback):
    """Reseed Python ``random``, numpy and torch (CPU and every GPU) from (seed, epoch, batch) before each training and
    each validation batch.

    The global RNG drives dropout and TiM's generation seeds. Lightning and the loaders also draw from it, at
    moments that differ between a fresh and a resumed run (iterator seeds, sanity check), so neither a saved RNG
    state nor one seed per epoch makes a run resumed from ``last.ckpt`` continue the uninterrupted one (measured:
    the first batch after resuming saw another RNG state). With one stream per batch every batch trains with the
    same draws either way, and every variant with one seed gets the same streams, so dropout matches across arms.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._reseed(step_seed(self.seed, trainer.current_epoch, batch_idx))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        # online TiM draws a thought per validation batch too: without this its val loss (early stopping, best
        # checkpoint, LR schedule) would depend on where the run was resumed (measured: a killed cell's comparison)
        self._reseed(step_seed(self.seed, trainer.current_epoch, batch_idx, validation=True))

    @staticmethod
    def _reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class TrainingBar(pl.Callback):
    """A progress widget over the run's training batches (epochs x batches) while a person watches in JupyterLab
    (:func:`nycdata.console.live_frontend`); nothing headless, where :class:`EpochLog`'s lines tell the progress and a
    widget would be a dead blob in the executed notebook. Lightning's own bar stays off (``enable_progress_bar``)."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer, pl_module):
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if not (trainer.is_global_zero and console.live_frontend() and math.isfinite(batches) and batches > 0
                and epochs is not None and epochs > 0):
            return
        self.bar = console.progress(epochs * int(batches), "fine-tuning", unit="batches", final=False,
                                    initial=trainer.current_epoch * int(batches))  # a resumed run starts part-way

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is not None:
            self.bar.update()

    def on_train_end(self, trainer, pl_module):
        self._close(failed=False)  # short of max_epochs here means early stopping, not a failure

    def on_exception(self, trainer, pl_module, exception):
        self._close(failed=True)

    def _close(self, failed: bool) -> None:
        if self.bar is not None:
            self.bar.close(failed=failed)
            self.bar = None


# Lightning's INFO lines go to stderr through these loggers: "GPU available: ..., used: ...", "TPU available", the
# litlogger tip, "Using bf16 Automatic Mixed Precision", the CUDA_VISIBLE_DEVICES line and "`Trainer.fit` stopped:
# `max_epochs=N` reached" (EpochLog's last line says as much). fine_tune logs the one fact among them a reader needs,
# the device (device_summary). Lightning's warnings go through the warnings module and are not affected.
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                          "lightning.pytorch.accelerators.cuda")


@contextlib.contextmanager
def lightning_quiet():
    """Build and fit a Trainer without Lightning's info chatter and three warnings that say nothing about this run."""
    with console.quiet_loggers(*LIGHTNING_INFO_LOGGERS), warnings.catch_warnings():
        # the loaders' worker count is a parameter (num_workers), chosen per machine
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning 2.6's own _pytree helper builds torch's deprecated LeafSpec; nothing of ours to change
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        # a torchmetrics bug, not a metric computed before its update: in terratorch's metric collection the
        # ClasswiseWrapper'd per-class MulticlassAccuracy shares a compute group with the macro accuracy, and after
        # the first epoch only the group's first member is updated; the wrapper receives the shared state and update
        # count but its inner metric's count stays 0, so its compute() warns although its values are right (checked
        # against a collection without compute groups)
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric MulticlassAccuracy was called "
                                                  r"before the ``update`` method", category=UserWarning)
        yield


def device_summary(trainer: pl.Trainer) -> str:
    """Where a Trainer runs, in one line (what Lightning's silenced "GPU available: ..., used: ..." said)."""
    device = trainer.strategy.root_device
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    count = trainer.num_devices
    return (f"training on {device.type}{name}, {count} device{'' if count == 1 else 's'}, "
            f"precision {trainer.precision}")


def make_trainer(params: Mapping, run_dir: Path, log: Callable[[str], None], callbacks=()) -> pl.Trainer:
    """The Trainer of :func:`nycdata.study.config.trainer_config` (what ``export-config`` prints), but with a CSV
    logger that appends when a run resumes, a plain line per epoch for headless logs and a widget bar in JupyterLab."""
    config = trainer_config(params, run_dir)
    configured = [instantiate(spec) for spec in config.pop("callbacks")]
    plugins = [instantiate(spec) for spec in config.pop("plugins")]
    config.pop("logger")
    return pl.Trainer(**config, plugins=plugins, logger=_appending_csv_logger(run_dir),
                      callbacks=[*configured, EpochLog(log), TrainingBar(), *callbacks])


def fine_tune(params: Mapping, seed: int | None = None, resume: bool | None = None,
              log: Callable[[str], None] = print, callbacks=()) -> dict:
    """Fine-tune ``params['variant']`` on fold ``params['fold']`` with ``seed``; return (and write) the train summary.

    With ``devices`` > 1 Lightning runs one process per device (``strategy``); only the first writes the summary.
    """
    cell = Params(params).replace(seed=params["seed"] if seed is None else seed)  # checked once, here
    variant = get_variant(cell["variant"])
    resume = cell["resume"] if resume is None else resume
    run = RunLayout.of(cell)
    layout = run.cell_of(cell)
    primary = launched_rank() == 0  # the other ranks of a `ddp` launch re-run this function: they only train
    if primary:
        _check_run_dir(layout.root, resume)
    if layout.train_summary.is_file():
        log(f"{layout.root} already finished; nothing to resume")
        return json.loads(layout.train_summary.read_text())
    if primary:
        record_folds(cell)  # folds.csv, or an error when the run folder's folds were other ones
        resume = resume and checkpoints.resumable(run, layout, log)  # a corrupt last.ckpt is set aside: from scratch
    else:
        resume = resume and layout.last_checkpoint.is_file()
    datamodule = variant_datamodule(cell, variant, log)
    torch.backends.cudnn.benchmark = not cell["deterministic"]  # fixed input sizes: cuDNN picks its fastest kernels once
    seed_everything(cell["seed"])
    task = build_task(cell, variant)
    groups = parameter_groups(task.model)
    with lightning_quiet():
        trainer = make_trainer(cell, layout.root, log, [*callbacks, *_injected_kill(layout.root)])
        if trainer.is_global_zero:
            log(device_summary(trainer))
        started = time.monotonic()
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(layout.last_checkpoint) if resume else None)
        finally:  # an interrupted leg still counts towards the run's wall time
            if trainer.is_global_zero:
                _add_wall_time(layout.root, time.monotonic() - started)
    if not trainer.is_global_zero:
        return {}
    summary = _write_summary(layout.root, variant, cell, trainer, groups)
    checkpoints.finish(layout)  # no resuming a finished cell: its last.ckpt (with optimizer state) goes
    return summary


# Crash-recovery tests set this to "<cell folder>:<epoch>": the process training that cell is SIGKILLed as that epoch
# starts (a job killed by its scheduler, out of memory, a node lost), from inside a launcher's job and notebook kernel.
KILL_ENV = "NYCDATA_KILL_CELL_AT_EPOCH"


class KillAtEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def _injected_kill(run_dir: Path) -> list:
    folder, _, epoch = os.environ.get(KILL_ENV, "").rpartition(":")
    return [KillAtEpoch(int(epoch))] if folder and Path(folder).resolve() == Path(run_dir).resolve() else []


def launched_rank() -> int:
    """This process's rank in a multi-process launch (Lightning's ``ddp`` children, SLURM tasks); 0 otherwise."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder {run_dir} already exists; pass resume=true to continue it from "
                              f"{CellLayout(run_dir).last_checkpoint.relative_to(run_dir)}, or choose another run_name")


def _write_summary(run_dir: Path, variant: Variant, params: Mapping, trainer: pl.Trainer, groups) -> dict:
    epochs = read_epoch_metrics(run_dir)
    best = epochs.loc[epochs[MONITOR].idxmin()]
    summary = {
        "variant": variant.name, "seed": params["seed"], "fold": params["fold"] if params["cv_folds"] else None,
        "cv_folds": params["cv_folds"], "thought_seed": params["thought_seed"] if variant.is_tim else None,
        "tim_share_embeddings": params["tim_share_embeddings"] if variant.is_tim else None,
        "tim_random_generator": params["tim_random_generator"] if variant.is_tim else None,
        "deterministic": params["deterministic"], "world_size": trainer.world_size,
        "epochs_run": int(epochs["epoch"].max()) + 1,
        "max_epochs": trainer.max_epochs, "stopped_early": bool(trainer.should_stop and trainer.current_epoch < trainer.max_epochs),
        "best_epoch": int(best["epoch"]), "best_val": {k: float(v) for k, v in best.items() if k.startswith("val/")},
        "wall_time_s": _add_wall_time(run_dir, 0.0),
        "parameters": groups.to_dict(orient="index"),
        "best_checkpoint": CellLayout(run_dir).best_checkpoint.relative_to(run_dir).as_posix(),
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
