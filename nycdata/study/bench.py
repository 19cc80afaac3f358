"""``python -m nycdata bench``: what decides how long the study takes, measured in one process on the same inputs.

Per variant (``baseline``, online ``tim``, ``tim_cached``): median train-step time (forward, backward, AdamW
step) after warm-up, inference time per chip, peak memory; plus thought-caching time per chip and data-loader
throughput reading real chip files with the configured workers. Peak memory is CUDA's max allocated on a GPU;
on the CPU it is the growth of the process's resident set while the variant ran (approximate).

From those numbers and the dataset's split sizes it projects the study of the params (``variants`` x ``seeds``
x folds x ``max_epochs``), as configured and with every online TiM variant swapped for its ``*_cached`` twin.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Mapping

import torch

from nycdata.data import chips
from nycdata.data.dataset import ChipDataset, NYCDataModule, prepare_dataset, split_spec
from nycdata.data.thoughts import THOUGHTS_KEY, tokens_to_map
from nycdata.io import write_json
from nycdata.model.thinking import cached_samples, think_chip
from nycdata.model.variants import cached_twin, get_variant
from nycdata.params import resolve_path
from nycdata.runs import RunLayout
from nycdata.study.summaries import time_train_step
from nycdata.study.train import build_task

VARIANTS = ("baseline", "tim", "tim_cached")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _median_seconds(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _inputs(batch: dict, variant, device: str) -> dict:
    x = {m: v.to(device) for m, v in batch["image"].items() if m in variant.modalities}
    if variant.cached:  # ids in the vocabulary's range: timing does not depend on their values
        B, _, T, H, W = next(iter(x.values())).shape
        x[THOUGHTS_KEY] = tokens_to_map(torch.randint(0, 4000, (B, 1, T, H // 16, W // 16))).to(device)
    return x


def bench_variant(params: Mapping, name: str, batch: dict, device: str, warmup: int, repeats: int) -> dict:
    variant = get_variant(name)
    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    task = build_task(params, variant).to(device)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)
    x, y = _inputs(batch, variant, device), batch["mask"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=str(params["precision"]).startswith("bf16"))

    def infer():
        with torch.no_grad(), autocast:
            task.model(dict(x))

    train_s = time_train_step(task, {"image": x, "mask": y}, repeats, warmup, optimizer, params["precision"])["step_s"]
    task.eval()
    infer_s = _median_seconds(infer, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - rss_before
    del task, optimizer
    return {"train_step_s": train_s, "infer_s_per_chip": infer_s / len(y), "peak_mem_mb": peak}


def bench_loader(params: Mapping, min_seconds: float = 2.0) -> float:
    """Chips per second the train loader delivers (D4, configured workers), reading chip files from disk."""
    loader = NYCDataModule.from_params(params, pin_memory=torch.cuda.is_available()).train_dataloader()
    chips, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for batch in loader:
            chips += len(batch["filename"])
    return chips / (time.perf_counter() - started)


def bench_thought_cache(params: Mapping, device: str, n_chips: int = 2) -> float:
    """Seconds per chip to think all 8 D4 transforms x the cached samples (the caching pass)."""
    task = build_task(params, get_variant("tim")).to(device).eval()
    dataset = ChipDataset(resolve_path(params["data_root"]), "train", get_variant("tim").modalities)
    think_chip(task, dataset[0], 1, params["thought_seed"], params["precision"])  # warm-up
    _sync(device)
    started = time.perf_counter()
    for i in range(min(n_chips, len(dataset))):
        think_chip(task, dataset[i], cached_samples(params), params["thought_seed"], params["precision"])
    _sync(device)
    return (time.perf_counter() - started) / min(n_chips, len(dataset))


def run_bench(params: Mapping, device: str = "cpu", warmup: int = 2, repeats: int = 5,
              log: Callable[[str], None] = print) -> dict:

    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible")
        torch.backends.cudnn.benchmark = True
    prepare_dataset(params, log, validate=False)
    batch = next(iter(NYCDataModule.from_params(params, num_workers=0, augment="none").train_dataloader()))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "model_size": params["model_size"], "batch_size": len(batch["mask"]),
              "chip_size": int(batch["mask"].shape[-1]), "timesteps": params["timesteps"], "precision": params["precision"],
              "variants": {}}
    for name in VARIANTS:
        result["variants"][name] = bench_variant(params, name, batch, device, warmup, repeats)
        log(f"{name}: {result['variants'][name]}")
    v = result["variants"]
    result["tim_over_baseline"] = v["tim"]["train_step_s"] / v["baseline"]["train_step_s"]
    result["tim_cached_over_baseline"] = v["tim_cached"]["train_step_s"] / v["baseline"]["train_step_s"]
    result["thought_cache_s_per_chip"] = bench_thought_cache(params, device)
    result["loader_chips_per_s"] = bench_loader(params)
    result["gpu_chips_per_s_baseline"] = result["batch_size"] / v["baseline"]["train_step_s"]
    result["loader_over_consumption"] = result["loader_chips_per_s"] / result["gpu_chips_per_s_baseline"]
    result["projection"] = project_study(params, result)
    return result


def _timed_as(name: str) -> str:
    """The benchmarked variant whose step time stands in for ``name`` (inputs aside: S1-only runs cost less)."""
    variant = get_variant(name)
    return "tim_cached" if variant.cached else "tim" if variant.is_tim else "baseline"


def project_study(params: Mapping, result: dict) -> dict:
    """Hours the study of ``params`` takes at the measured speeds: every epoch runs (early stopping only shortens)."""
    index = chips.read_index(resolve_path(params["data_root"]))
    folds = max(params["cv_folds"], 1)
    if params["cv_folds"]:  # chips per split averaged over the folds

        counts = chips.fold_roles(index, split_spec(params)).groupby("split")["chips"].sum() / folds
    else:
        counts = index["split"].value_counts()
    n_train, n_val, n_test = (round(float(counts.get(split, 0))) for split in chips.SPLITS)
    steps = -(-n_train // params["batch_size"])

    def cell_hours(name: str) -> float:
        timing = result["variants"][_timed_as(name)]
        epoch = steps * timing["train_step_s"] + n_val * timing["infer_s_per_chip"]
        test = n_test * timing["infer_s_per_chip"] * (params["thought_samples"] if get_variant(name).is_tim else 1)
        return (params["max_epochs"] * epoch + test) / 3600

    def study_hours(names) -> float:
        caching = len(index) * sum(get_variant(n).cached for n in names)  # every chip, once per run folder
        return folds * len(params["seeds"]) * sum(map(cell_hours, names)) + caching * result["thought_cache_s_per_chip"] / 3600

    names = list(params["variants"])
    cached = [cached_twin(n) or n for n in names]
    return {"variants": names, "seeds": len(params["seeds"]), "folds": folds, "max_epochs": params["max_epochs"],
            "train_chips": n_train,
            "val_chips": n_val, "test_chips": n_test, "hours": study_hours(names), "variants_cached": cached,
            "hours_cached": study_hours(cached)}


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']} ({result['torch_threads']} torch threads); terramind_v1_{result['model_size']}, "
             f"batch {result['batch_size']} x {result['timesteps']} timesteps x {result['chip_size']} px, {result['precision']}.", "",
             "| variant | train step (s) | vs baseline | inference (s/chip) | peak memory (MB) |", "|---|---|---|---|---|"]
    base = result["variants"]["baseline"]["train_step_s"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['train_step_s']:.3f} | {v['train_step_s'] / base:.2f}x | {v['infer_s_per_chip']:.4f} | "
                     f"{v['peak_mem_mb']:.0f} |")
    lines += ["", f"Thought caching: {result['thought_cache_s_per_chip']:.2f} s per chip (8 D4 transforms x cached samples). "
              f"Data loader: {result['loader_chips_per_s']:.1f} chips/s = {result['loader_over_consumption']:.1f}x what "
              "baseline training consumes."]
    if "projection" in result:
        p = result["projection"]
        lines += ["", f"Projected study ({len(p['variants'])} variants x {p['seeds']} seeds x {p['folds']} folds x "
                  f"{p['max_epochs']} epochs at most, {p['train_chips']} train chips per fold): {p['hours']:.2f} h ({p['hours'] * 60:.0f} min) as configured, "
                  f"{p['hours_cached']:.2f} h ({p['hours_cached'] * 60:.0f} min) with cached thoughts."]
    return "\n".join(lines)


def write_bench(params: Mapping, result: dict) -> tuple:
    layout = RunLayout.of(params)
    path = write_json(layout.bench_json, result)
    table = layout.bench_md
    table.write_text(markdown(result) + "\n")
    return path, table
