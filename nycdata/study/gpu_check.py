"""``python -m nycdata gpu-check``: is a GPU box ready for the study, and how long and how much disk will it take?

Without the real chips and without downloading weights, at the study's real shape and model size:

1. a synthetic chip dataset at the real shape (``--chips`` chips of ``--size`` px x ``--timesteps``; defaults 64,
   the params' ``chip_size`` and ``timesteps``: 256 px x 4) in the check's run folder (reused when already there);
2. the interleaved bench of :mod:`nycdata.study.bench` (``baseline``, online ``tim``, ``tim_cached``: train step,
   inference, peak memory, the floors, FLOPs, top operations, loader) with random weights at the params'
   ``model_size``, ``precision`` and ``batch_size`` (``params/nyc.yaml``: base, bf16-mixed, 8);
3. thought caching of every chip, as a ``tim_cached`` run does it (time and size per chip);
4. one short fine-tune of ``baseline`` end to end (``--epochs``, default 2) through
   :func:`nycdata.study.train.fine_tune`: checkpoints, metrics, ``train_summary.json`` (time per epoch, disk);
5. the projections: the study of the params (variants x seeds x folds x ``max_epochs``) in hours, one
   ``max_epochs``-epoch baseline run in seconds next to its arithmetic limit, and the study's disk use
   (every cell's folder plus the thought caches) against 30 GB.

The check runs under the params files (``-f``, default ``params/nyc.yaml``) with ``run_name: gpu_check``,
``pretrained: false``, ``allow_random_generator: true``, ``accelerator: auto``, ``cv_folds: 0`` and the synthetic
dataset; ``-p`` overrides win over all of these and apply to the projected study too. It writes ``bench.json`` and
``bench.md`` into ``output_root/gpu_check`` (``--out`` sets ``output_root``). An out-of-memory error stops it with
a message naming the variant, batch and chip size and what to lower.

Without the real dataset at the params' ``data_root`` the study is projected for ``--study-chips`` chips (default
400: the NYC bbox holds about 5 x 5 parent cells of 1024 px, 16 chips of 256 px each), split as the params' split
rules would on average (:func:`nycdata.study.bench.expected_split_counts`); with it, from its own splits.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import lightning.pytorch as pl

from nycdata.data.chips import SPEC_FILE
from nycdata.data.fixture import FixtureConfig, ensure_fixture, make_fixture
from nycdata.data.thoughts import CACHE_DONE_FILE, cache_root
from nycdata.model.variants import cached_twin, get_variant
from nycdata.params import DEFAULTS_FILE, Params, load_params, resolve_path
from nycdata.runs import RunLayout
from nycdata.study.bench import (expected_split_counts, markdown, out_of_memory_guard, project_study, resolve_device,
                                 run_bench, timed_as, write_bench)
from nycdata.study.train import cache_thoughts, fine_tune

RUN_NAME = "gpu_check"
STUDY_CHIPS = 400  # chips of the real dataset assumed when it is not there to count
DISK_LIMIT_BYTES = 30e9  # the GPU box's disk budget for output_root
H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
TARGET_BASELINE_RUN_S = 120.0  # a max_epochs baseline run should take under 2 minutes on an H100


def study_params(files: Sequence[str | Path], overrides: Mapping) -> Params:
    """The study the check projects: the params files (default ``params/nyc.yaml``) and the ``-p`` overrides."""
    return load_params(*(files or [DEFAULTS_FILE]), overrides=overrides)


def check_params(study: Params, overrides: Mapping, size: int, timesteps: int, epochs: int,
                 out: str | Path | None = None) -> Params:
    """The check's own params: the study's, with random weights, one device, the fixed split and the synthetic
    dataset below ``output_root/gpu_check``; ``overrides`` (``-p``) win, then ``out`` sets ``output_root``."""
    changes = {"run_name": RUN_NAME, "fixture": False, "timesteps": timesteps, "chip_size": size, "pretrained": False,
               "allow_random_generator": True, "tim_random_generator": False, "backbone_ckpt_path": "",
               "accelerator": "auto", "devices": 1, "cv_folds": 0, "fold": 0, "max_epochs": epochs, "resume": False,
               "variant": "baseline", "deterministic": False}
    params = study.replace(**{**changes, **overrides, **({"output_root": str(out)} if out else {})})
    return params.replace(data_root=str(RunLayout.of(params).synthetic_data))


def make_dataset(params: Params, n_chips: int, size: int, log: Callable[[str], None]) -> Path:
    """The synthetic chips at ``data_root``: reused when the same ones are there, else (re)generated."""
    config = FixtureConfig(chips=n_chips, size=size, timesteps=params["timesteps"], seed=params["fixture_seed"])
    data_root = resolve_path(params["data_root"])
    try:
        return ensure_fixture(data_root, config)
    except FileExistsError:
        log(f"gpu-check: {data_root} holds other synthetic chips; regenerating")
        return make_fixture(data_root, config, overwrite=True)


def dir_bytes(path: Path) -> int:
    """Bytes of every file below ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class EpochClock(pl.Callback):
    """Seconds of each training epoch (validation included), from the start of training."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.marks = [time.monotonic()]

    def on_train_epoch_end(self, trainer, pl_module):
        self.marks.append(time.monotonic())

    @property
    def epoch_s(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def cache_all_thoughts(params: Params, log: Callable[[str], None]) -> dict:
    """Fill ``tim_cached``'s thought cache for every chip (as a study run does; any old cache is replaced) and
    measure it: seconds and bytes per chip."""
    variant = get_variant("tim_cached")
    cache_params = params.replace(variant=variant.name)
    shutil.rmtree(cache_root(cache_params, variant.online), ignore_errors=True)  # measure a fresh pass
    with out_of_memory_guard("caching thoughts with", variant.online, params, params["chip_size"]):
        root = cache_thoughts(cache_params, variant, log)
    done = json.loads((root / CACHE_DONE_FILE).read_text())
    files = dir_bytes(root) - (root / CACHE_DONE_FILE).stat().st_size
    return {"chips": done["chips"], "samples": done["identity"]["samples"], "seconds": done["seconds"],
            "s_per_chip": done["seconds"] / done["chips"], "bytes_per_chip": files / done["chips"], "folder": str(root)}


def short_fine_tune(params: Params, log: Callable[[str], None]) -> dict:
    """One ``baseline`` fine-tune of ``max_epochs`` epochs end to end (any old one replaced); its time and disk."""
    cell = RunLayout.of(params).cell_of(params)
    shutil.rmtree(cell.root, ignore_errors=True)
    clock = EpochClock()
    with out_of_memory_guard("fine-tuning", params["variant"], params, params["chip_size"]):
        summary = fine_tune(params, log=log, callbacks=[clock])
    epoch_s = clock.epoch_s
    steady = statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
    return {"variant": params["variant"], "epochs": summary["epochs_run"], "wall_s": summary["wall_time_s"],
            "epoch_s": epoch_s, "steady_epoch_s": steady,
            "startup_s": max(summary["wall_time_s"] - steady * len(epoch_s), 0.0),
            "best_val": summary["best_val"], "cell": str(cell.root), "train_summary": str(cell.train_summary),
            "cell_bytes": dir_bytes(cell.root),
            "checkpoint_files": {p.name: p.stat().st_size for p in sorted(cell.checkpoints.glob("*")) if p.is_file()}}


def project_baseline_run(result: dict, study: dict, check: dict, fine_tune: dict, peak_flops: float = H100_BF16_PEAK) -> dict:
    """One ``max_epochs`` baseline run of the study: from the bench's step times alone, and from the fine-tune's
    measured epoch (loader, validation and Lightning included) scaled from the check's split to the study's; next to
    the arithmetic limit (FLOPs over an H100's dense bf16 peak, and at 40-50 % of it)."""
    v = result["variants"]["baseline"]

    def epoch(projection: dict) -> float:
        return projection["steps_per_epoch"] * v["train_step_s"] + projection["val_chips"] * v["infer_s_per_chip"]

    epochs = study["max_epochs"]
    test_s = study["test_chips"] * v["infer_s_per_chip"]
    scale = epoch(study) / epoch(check)
    measured = fine_tune["startup_s"] + epochs * fine_tune["steady_epoch_s"] * scale + test_s
    chip_steps = epochs * study["train_chips"]
    flops = chip_steps * v["flops_per_chip_step"]
    return {"epochs": epochs, "train_chips": study["train_chips"], "val_chips": study["val_chips"],
            "from_bench_s": study["cell_s"]["baseline"], "from_fine_tune_s": measured,
            "fine_tune_epoch_over_bench_epoch": fine_tune["steady_epoch_s"] / epoch(check),
            "target_s": TARGET_BASELINE_RUN_S, "under_target": measured < TARGET_BASELINE_RUN_S,
            "chip_steps": chip_steps, "tflop_per_chip_step": v["flops_per_chip_step"] / 1e12, "pflop": flops / 1e15,
            "limit_at_peak_s": flops / peak_flops, "limit_at_50pct_s": flops / (0.5 * peak_flops),
            "limit_at_40pct_s": flops / (0.4 * peak_flops), "peak_flops": peak_flops,
            "achieved_tflops": v["flops_per_chip_step"] * result["batch_size"] / v["train_step_s"] / 1e12}


def project_disk(study: Mapping, cell_bytes: float, checkpoint_files: Sequence[float], weights: Mapping[str, float],
                 optimizer: Mapping[str, float], cache_bytes_per_chip: float, n_chips: int,
                 dataset_bytes_per_chip: float, limit: float = DISK_LIMIT_BYTES) -> dict:
    """Bytes the study of ``study`` leaves on disk: every finished cell's folder plus, with cached thoughts, one
    thought cache of every chip per ``*_cached`` variant; and whether that fits ``limit``. The dataset is counted apart.

    A cell's folder is the measured finished ``baseline`` cell (``cell_bytes``), each of its checkpoint files
    (``checkpoint_files``, bytes) grown or shrunk for another variant by that variant's ``weights`` (and, for a file
    the size of a full checkpoint, ``optimizer`` state) minus baseline's (``weights`` as checkpoints hold them: TiM's
    frozen generator is left out). Variants are costed as their benchmarked stand-in (:func:`nycdata.study.bench.timed_as`)."""
    runs = max(study["cv_folds"], 1) * len(study["seeds"])
    full = {name: weights[name] + optimizer[name] for name in weights}
    holds_optimizer = [abs(size - full["baseline"]) < abs(size - weights["baseline"]) for size in checkpoint_files]

    def cell(name: str) -> float:
        stand_in = timed_as(name)
        return cell_bytes + sum((full if both else weights)[stand_in] - (full if both else weights)["baseline"]
                                for both in holds_optimizer)

    names = list(study["variants"])
    cached = [cached_twin(n) or n for n in names]
    caches = n_chips * cache_bytes_per_chip * sum(get_variant(n).cached for n in cached)
    total = runs * sum(map(cell, names))
    total_cached = runs * sum(map(cell, cached)) + caches
    dataset = n_chips * dataset_bytes_per_chip
    return {"cells": runs * len(names), "cell_bytes": {n: cell(n) for n in dict.fromkeys(names + cached)},
            "measured_cell_bytes": cell_bytes, "checkpoint_files_bytes": list(checkpoint_files),
            "checkpoint_files_hold_optimizer": holds_optimizer, "weights_bytes": dict(weights),
            "optimizer_state_bytes": dict(optimizer), "thought_cache_bytes_per_chip": cache_bytes_per_chip,
            "chips": n_chips, "thought_caches_bytes": caches, "study_bytes": total, "study_bytes_cached": total_cached,
            "dataset_bytes": dataset, "limit_bytes": limit, "fits": total <= limit, "fits_cached": total_cached <= limit,
            "fits_with_dataset": max(total, total_cached) + dataset <= limit}


def run_gpu_check(files: Sequence[str | Path] = (), overrides: Mapping | None = None, chips: int = 64,
                  size: int | None = None, timesteps: int | None = None, out: str | Path | None = None,
                  rounds: int = 5, steps: int = 3, warmup: int = 2, epochs: int = 2, study_chips: int = STUDY_CHIPS,
                  loader_seconds: float = 2.0, log: Callable[[str], None] = print) -> dict:
    """Run every stage of the module docstring; write and return ``bench.json``'s content."""
    overrides = dict(overrides or {})
    started = time.monotonic()
    study = study_params(files, overrides)
    size, timesteps = size or study["chip_size"], timesteps or study["timesteps"]
    params = check_params(study, overrides, size, timesteps, epochs, out)
    device = resolve_device("auto")
    stages: dict[str, float] = {}

    def stage(number: int, text: str) -> None:
        log(f"gpu-check [{number}/5] {text} ({time.monotonic() - started:.0f} s)")

    if device == "cpu":
        log(f"gpu-check: no CUDA device visible, running on the CPU ({params['model_size']} model, {size} px x "
            f"{timesteps} timesteps): expect minutes per step; -p model_size tiny -p batch_size 2 --chips 8 is lighter")
    stage(1, f"synthetic dataset: {chips} chips of {size} px x {timesteps} timesteps in {params['data_root']}")
    mark = time.monotonic()
    data_root = make_dataset(params, chips, size, log)
    stages["dataset_s"] = time.monotonic() - mark

    stage(2, f"bench on {device}: terramind_v1_{params['model_size']}, batch {params['batch_size']}, {params['precision']}, "
             f"{rounds} rounds x {steps} steps")
    mark = time.monotonic()
    result = run_bench(params, device, warmup=warmup, rounds=rounds, steps=steps, log=log, think_chips=0,
                       loader_seconds=loader_seconds, profile=True, project=False)
    stages["bench_s"] = time.monotonic() - mark

    stage(3, f"thought cache of all {chips} chips")
    mark = time.monotonic()
    cache = cache_all_thoughts(params, log)
    result["thought_cache_s_per_chip"] = cache["s_per_chip"]
    stages["thought_cache_s"] = time.monotonic() - mark

    stage(4, f"fine-tune of baseline, {epochs} epoch(s)")
    mark = time.monotonic()
    fine_tune = short_fine_tune(params, log)
    stages["fine_tune_s"] = time.monotonic() - mark

    stage(5, "projections")
    real_data = resolve_path(study["data_root"])
    if (real_data / SPEC_FILE).is_file():
        projection = project_study(study, result)
        source = f"the dataset at {real_data}"
    else:
        projection = project_study(study, result, expected_split_counts(study, study_chips), study_chips)
        source = (f"{study_chips} chips assumed (no dataset at {real_data}), split as cv_folds={study['cv_folds']} "
                  f"and split_fractions={list(study['split_fractions'])} would on average")
    result["projection"] = projection
    result["projection_source"] = source
    check_projection = project_study(params, result)
    result["fine_tune"] = fine_tune
    result["baseline_run"] = project_baseline_run(result, projection, check_projection, fine_tune)
    variants = result["variants"]
    result["disk"] = project_disk(study, fine_tune["cell_bytes"], list(fine_tune["checkpoint_files"].values()),
                                  {n: v["weights_mb"] * 2**20 for n, v in variants.items()},
                                  {n: v["optimizer_state_mb"] * 2**20 for n, v in variants.items()},
                                  cache["bytes_per_chip"], projection["chips"], dir_bytes(data_root) / chips)
    result["thought_caching"] = cache
    stages["total_s"] = time.monotonic() - started
    result["gpu_check"] = {"chips": chips, "size": size, "timesteps": timesteps, "data_root": str(data_root),
                           "run_folder": str(RunLayout.of(params).root), "stages": stages,
                           "study_params": [str(f) for f in files] or [str(DEFAULTS_FILE)], "overrides": overrides}
    paths = write_bench(params, result, gpu_markdown(result))
    log(markdown(result) + "\n\n" + gpu_markdown(result))
    log(f"gpu-check: finished in {stages['total_s']:.0f} s; wrote {paths[0]} and {paths[1]}")
    return result


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def gpu_markdown(result: dict) -> str:
    """The gpu-check's own section of ``bench.md``: fine-tune, baseline run, study time and disk."""
    ft, run, p, d, g = (result[k] for k in ("fine_tune", "baseline_run", "projection", "disk", "gpu_check"))
    cache = result["thought_caching"]
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in g["stages"].items())
    return "\n".join([
        f"## gpu-check ({stages})",
        "",
        f"Synthetic chips: {g['chips']} of {g['size']} px x {g['timesteps']} timesteps; random weights. Thought cache: "
        f"{cache['chips']} chips x 8 transforms x {cache['samples']} samples in {cache['seconds']:.1f} s "
        f"({cache['s_per_chip']:.2f} s and {cache['bytes_per_chip'] / 1e3:.1f} kB per chip).",
        "",
        f"Fine-tune ({ft['variant']}, {ft['epochs']} epoch(s), end to end): {ft['wall_s']:.1f} s; epochs "
        f"{', '.join(f'{s:.1f}' for s in ft['epoch_s'])} s ({ft['steady_epoch_s']:.1f} s steady, "
        f"{run['fine_tune_epoch_over_bench_epoch']:.2f}x the bench's step times; start-up {ft['startup_s']:.1f} s); "
        f"finished cell folder {_gb(ft['cell_bytes'])} (checkpoints: "
        + ", ".join(f"{name} {_gb(size)}" for name, size in ft["checkpoint_files"].items())
        + f"). train_summary: `{ft['train_summary']}`.",
        "",
        f"**One {run['epochs']}-epoch baseline run** ({run['train_chips']} train, {run['val_chips']} val chips): "
        f"{run['from_fine_tune_s']:.0f} s from the measured fine-tune epochs, {run['from_bench_s']:.0f} s from bench step "
        f"times alone (target under {run['target_s']:.0f} s on an H100: {'met' if run['under_target'] else 'NOT met'} here). "
        f"Arithmetic limit: {run['chip_steps']:,} chip-steps x {run['tflop_per_chip_step']:.3g} TFLOP = "
        f"{run['pflop']:.3g} PFLOP = {run['limit_at_peak_s']:.3g} s at an H100's {run['peak_flops'] / 1e12:.0f} TFLOP/s "
        f"dense bf16 peak, {run['limit_at_50pct_s']:.3g}-{run['limit_at_40pct_s']:.3g} s at 50-40 % of it; this device "
        f"reached {run['achieved_tflops']:.3g} TFLOP/s in the baseline train step.",
        "",
        f"**The study** ({len(p['variants'])} variants x {p['seeds']} seeds x {p['folds']} folds = {d['cells']} cells, "
        f"{p['max_epochs']} epochs at most; chips: {result['projection_source']}): "
        f"{p['hours']:.2f} h and {_gb(d['study_bytes'])} as configured; {p['hours_cached']:.2f} h and "
        f"{_gb(d['study_bytes_cached'])} with cached thoughts ({_gb(d['thought_caches_bytes'])} of thought caches). "
        f"Disk limit {_gb(d['limit_bytes'])}: {'fits' if d['fits'] else 'does NOT fit'} as configured, "
        f"{'fits' if d['fits_cached'] else 'does NOT fit'} with cached thoughts; the dataset itself adds about "
        f"{_gb(d['dataset_bytes'])} ({'fits' if d['fits_with_dataset'] else 'does NOT fit'} together). Per cell: "
        + ", ".join(f"{n} {_gb(b)}" for n, b in d["cell_bytes"].items()) + ".",
    ])
