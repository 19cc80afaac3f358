"""Test finished runs on the test split: per-chip confusion matrices, metrics, the TiM-vs-baseline comparison.

Everything is derived from per-chip confusion matrices, saved as
``per_chip.csv`` (chip_id, parent_id, variant, seed, ``cm_<true>_<pred>``),
so later analyses (bootstrap over parents) never re-run a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch

from nycdata import chips
from nycdata.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.io import write_json
from nycdata.metrics import CM_COLUMNS, metrics_from_confusion, per_chip_confusion
from nycdata.params import resolve_path, run_root
from nycdata.train import SUMMARY_FILE, NYCSegmentationTask, seed_everything, variant_datamodule
from nycdata.variants import COMPARISONS, get_variant

TEST_METRICS_FILE = "test_metrics.json"
PER_CHIP_FILE = "per_chip.csv"
COMPARISON_FILE = "comparison.json"


@dataclass(frozen=True)
class FinishedRun:
    variant: str
    seed: int
    path: Path


def finished_runs(root: Path) -> list[FinishedRun]:
    """Every ``<variant>/seed<k>`` under ``root`` whose training finished (has ``train_summary.json``)."""
    runs = []
    for summary in sorted(Path(root).glob(f"*/seed*/{SUMMARY_FILE}")):
        info = json.loads(summary.read_text())
        runs.append(FinishedRun(info["variant"], int(info["seed"]), summary.parent))
    return runs


def load_task(run: FinishedRun, device: str = "cpu") -> NYCSegmentationTask:
    checkpoint = run.path / "checkpoints" / "best.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} missing: the run {run.variant}/seed{run.seed} has no best checkpoint")
    return NYCSegmentationTask.load_from_checkpoint(checkpoint, map_location=device).eval().to(device)


@torch.no_grad()
def predict_confusions(task, loader, device: str = "cpu") -> tuple[list[str], np.ndarray]:
    """Per-chip confusion matrices ``[N, 5, 5]`` of a model over a loader."""
    names, matrices = [], []
    for batch in loader:
        image = {m: x.to(device) for m, x in batch["image"].items()}
        pred = task.model(image).output.argmax(1).cpu()
        matrices.append(per_chip_confusion(batch["mask"], pred))
        names.extend(batch["filename"])
    return names, np.concatenate(matrices)


@torch.no_grad()
def predict_maps(task, loader, device: str = "cpu") -> np.ndarray:
    """Predicted class maps ``[N, H, W]`` of a model over a loader."""
    preds = [task.model({m: x.to(device) for m, x in batch["image"].items()}).output.argmax(1).cpu() for batch in loader]
    return torch.cat(preds).numpy()


def test_run(run: FinishedRun, params: Mapping, datamodule, device: str = "cpu") -> pd.DataFrame:
    """Test one finished run; write its ``test_metrics.json``; return its per-chip rows.

    A TiM model samples its thought: it is tested ``thought_samples`` times (seeds ``seed``, ``seed+1``, ...);
    per-chip matrices pool all samples and ``test_metrics.json`` reports the mIoU of each and their spread.
    """
    samples = params["thought_samples"] if get_variant(run.variant).is_tim else 1
    if samples < 1:
        raise ValueError(f"thought_samples={samples}: must be at least 1")
    task, per_sample = load_task(run, device), []
    for k in range(samples):
        seed_everything(run.seed + k)  # fixed seeds: reproducible test numbers
        names, matrices = predict_confusions(task, datamodule.test_dataloader(), device)
        per_sample.append(matrices)
    matrices = np.sum(per_sample, axis=0)
    sample_miou = [metrics_from_confusion(m.sum(0))["miou"] for m in per_sample]
    write_json(run.path / TEST_METRICS_FILE, {
        "variant": run.variant, "seed": run.seed, "n_test_chips": len(names), **metrics_from_confusion(matrices.sum(0)),
        "confusion": matrices.sum(0).tolist(), "thought_samples": samples, "miou_per_thought_sample": sample_miou,
        "thought_spread_pp": float(np.std(sample_miou, ddof=1) * 100) if samples > 1 else 0.0})
    rows = pd.DataFrame(matrices.reshape(len(names), -1), columns=CM_COLUMNS)
    rows.insert(0, "chip_id", names)
    rows.insert(1, "variant", run.variant)
    rows.insert(2, "seed", run.seed)
    return rows


def test_all(params: Mapping, log: Callable[[str], None] = print, device: str = "cpu") -> pd.DataFrame:
    """Test every finished run of ``params``' run folder; write ``per_chip.csv``; return it."""
    root = run_root(params)
    runs = finished_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished fine-tune under {root}: run 03_finetune first")
    index = chips.read_index(resolve_path(params["data_root"]))[["chip_id", "parent_id"]]
    frames = []
    for run in runs:
        datamodule = variant_datamodule(params, get_variant(run.variant), log)
        frames.append(test_run(run, params, datamodule, device))
        log(f"tested {run.variant}/seed{run.seed}")
    per_chip = pd.concat(frames).merge(index, on="chip_id", how="left")
    per_chip = per_chip[["chip_id", "parent_id", "variant", "seed", *CM_COLUMNS]]
    per_chip.to_csv(root / PER_CHIP_FILE, index=False)
    return per_chip


def variant_metrics(per_chip: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and seed: test metrics from the summed confusion of all test chips."""
    rows = []
    for (variant, seed), group in per_chip.groupby(["variant", "seed"]):
        m = metrics_from_confusion(group[CM_COLUMNS].to_numpy().sum(0).reshape(NUM_CLASSES, NUM_CLASSES))
        rows.append({"variant": variant, "seed": seed, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
                     "macro_f1": m["macro_f1"], **{f"iou_{c}": m["iou"][c] for c in CLASS_NAMES}})
    return pd.DataFrame(rows)


def compare(per_chip: pd.DataFrame, n_boot: int = 2000) -> dict:
    """Every TiM-vs-baseline comparison both sides of which were tested: mean delta over seeds, seed spread,
    parent-grouped paired bootstrap CI, and the seed's gate on the mean delta."""
    from nycdata.stats import paired_bootstrap, with_gate

    table = variant_metrics(per_chip)
    result = {}
    for tim, base in COMPARISONS:
        if not (set(table.loc[table.variant == tim, "seed"]) & set(table.loc[table.variant == base, "seed"])):
            continue
        stats = with_gate(paired_bootstrap(per_chip, tim, base, n_boot=n_boot))
        means = table[table.seed.isin(stats["seeds"])].groupby("variant")["miou"].mean()
        result[f"{tim}_vs_{base}"] = {"tim": tim, "baseline": base, "tim_miou": float(means[tim]),
                                      "baseline_miou": float(means[base]), **stats}
    return result


def per_chip_gain(per_chip: pd.DataFrame, tim: str, baseline: str) -> pd.DataFrame:
    """Per test chip: mIoU of ``tim`` minus ``baseline`` in pp, each pooled over the seeds both ran."""
    seeds = set(per_chip.loc[per_chip.variant == tim, "seed"]) & set(per_chip.loc[per_chip.variant == baseline, "seed"])
    pooled = per_chip[per_chip.seed.isin(seeds)].groupby(["variant", "chip_id"])[CM_COLUMNS].sum()

    def chip_miou(variant: str) -> pd.Series:
        return pooled.loc[variant].apply(lambda row: metrics_from_confusion(row.to_numpy().reshape(NUM_CLASSES, NUM_CLASSES))["miou"], axis=1)

    gain = (chip_miou(tim) - chip_miou(baseline)) * 100
    return gain.rename("gain_pp").reset_index()
