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

from nycdata import console
from nycdata.data import chips
from nycdata.data.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.data.metrics import CM_COLUMNS, metrics_from_confusion, per_chip_confusion
from nycdata.io import write_json
from nycdata.model.variants import COMPARISONS, CONTROLS, get_variant
from nycdata.params import Params, resolve_path
from nycdata.runs import CellLayout, RunLayout
from nycdata.study.stats import paired_bootstrap, with_gate
from nycdata.study.train import NYCSegmentationTask, seed_everything, training_device, variant_datamodule



@dataclass(frozen=True)
class FinishedRun:
    variant: str
    seed: int
    path: Path
    fold: int | None = None  # None: the index's fixed split


def finished_runs(root: Path) -> list[FinishedRun]:
    """Every study cell under ``root`` whose training finished (has ``train_summary.json``):
    ``<variant>/seed<k>`` (fixed split) and ``<variant>/fold<f>/seed<k>`` (cross-validation)."""
    runs = []
    name = CellLayout(Path()).train_summary.name
    for pattern in (f"*/seed*/{name}", f"*/fold*/seed*/{name}"):
        for summary in sorted(Path(root).glob(pattern)):
            info = json.loads(summary.read_text())
            fold = info.get("fold")
            runs.append(FinishedRun(info["variant"], int(info["seed"]), summary.parent, None if fold is None else int(fold)))
    return runs


def tim_and_baseline_runs(root: Path, params: Mapping) -> tuple[FinishedRun, FinishedRun | None]:
    """The ``tim`` run of ``params``' seed and fold (else the first ``tim`` run) and the baseline of the same cell."""
    runs = {(r.variant, r.seed, r.fold): r for r in finished_runs(root)}
    fold = params["fold"] if params["cv_folds"] else None
    tim = runs.get(("tim", params["seed"], fold)) or next((r for (v, _, _), r in runs.items() if v == "tim"), None)
    if tim is None:
        raise FileNotFoundError(f"no finished 'tim' run under {root}: run 03_finetune with variant=tim first")
    return tim, runs.get(("baseline", tim.seed, tim.fold))


def run_params(params: Mapping, run: FinishedRun) -> dict:
    """``params`` for one finished cell: its variant, seed and fold (which decides its test chips)."""
    if (run.fold is None) != (not params["cv_folds"]):
        raise ValueError(f"{run.path} was trained {'on the fixed split' if run.fold is None else f'on fold {run.fold}'} "
                         f"but these params have cv_folds={params['cv_folds']}: evaluate it with the cv_folds it was "
                         "trained with")
    return Params(params).replace(variant=run.variant, seed=run.seed, fold=run.fold or 0)


def load_task(run: FinishedRun, device: str = "cpu") -> NYCSegmentationTask:
    checkpoint = CellLayout(run.path).best_checkpoint
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


def test_run(run: FinishedRun, params: Mapping, datamodule, device: str | None = None) -> pd.DataFrame:
    """Test one finished run; write its ``test_metrics.json``; return its per-chip rows.

    A TiM model samples its thought: it is tested ``thought_samples`` times; online TiM draws fresh thoughts
    (seeds ``seed``, ``seed+1``, ...), a ``*_cached`` variant reads cached sample k in pass k. Per-chip matrices
    pool all samples and ``test_metrics.json`` reports the mIoU of each and their spread.
    """
    device = str(device or training_device(params))
    samples = params["thought_samples"] if get_variant(run.variant).is_tim else 1
    if samples < 1:
        raise ValueError(f"thought_samples={samples}: must be at least 1")
    task, per_sample = load_task(run, device), []
    for k in range(samples):
        seed_everything(run.seed + k)  # fixed seeds: reproducible test numbers
        names, matrices = predict_confusions(task, datamodule.test_dataloader(thought_sample=k), device)
        per_sample.append(matrices)
    matrices = np.sum(per_sample, axis=0)
    sample_miou = [metrics_from_confusion(m.sum(0))["miou"] for m in per_sample]
    write_json(CellLayout(run.path).test_metrics, {
        "variant": run.variant, "seed": run.seed, "fold": run.fold, "n_test_chips": len(names),
        **metrics_from_confusion(matrices.sum(0)), "confusion": matrices.sum(0).tolist(), "thought_samples": samples,
        "miou_per_thought_sample": sample_miou,
        "thought_spread_pp": float(np.std(sample_miou, ddof=1) * 100) if samples > 1 else 0.0})
    rows = pd.DataFrame(matrices.reshape(len(names), -1), columns=CM_COLUMNS)
    rows.insert(0, "chip_id", names)
    rows.insert(1, "fold", run.fold)
    rows.insert(2, "variant", run.variant)
    rows.insert(3, "seed", run.seed)
    return rows


def test_all(params: Mapping, log: Callable[[str], None] = print, device: str | None = None) -> pd.DataFrame:
    """Test every finished run of ``params``' run folder on its own test chips (its fold's, under cross-validation);
    write ``per_chip.csv`` (every fold pooled: each test parent once per variant and seed); return it."""
    layout = RunLayout.of(params)
    runs = finished_runs(layout.root)
    if not runs:
        raise FileNotFoundError(f"no finished fine-tune under {layout.root}: run 03_finetune first")
    index = chips.read_index(resolve_path(params["data_root"]))[["chip_id", "parent_id"]]
    frames = []
    # a line per run says which was tested; the bar adds the ETA over the study's runs (and a widget in JupyterLab)
    for run in console.track(runs, "testing", unit="runs", log=log, final=False):
        cell = run_params(params, run)
        frames.append(test_run(run, cell, variant_datamodule(cell, get_variant(run.variant), log), device))
        log(f"tested {run.variant}/" + (f"fold{run.fold}/" if run.fold is not None else "") + f"seed{run.seed}")
    per_chip = pd.concat(frames).merge(index, on="chip_id", how="left")
    per_chip = per_chip[["chip_id", "parent_id", "fold", "variant", "seed", *CM_COLUMNS]]
    per_chip.to_csv(layout.per_chip, index=False)
    return per_chip


def arm_parameters(root: Path) -> dict[str, dict]:
    """Per variant, its trainable/frozen parameter groups (from a ``train_summary.json`` of the run folder)."""
    groups = {}
    for run in finished_runs(root):
        summary = json.loads(CellLayout(run.path).train_summary.read_text())
        if "parameters" in summary:
            groups.setdefault(run.variant, summary["parameters"])
    return groups

# Groups that must train alike in both arms of a comparison; thinking adds only the thought embedding (and a frozen
# generator and tokenizer) to a TiM arm.
MATCHED_GROUPS = ("input embeddings", "encoder blocks", "decoder and head")


def unmatched(groups: Mapping[str, Mapping], tim: str, baseline: str) -> list[str]:
    """How the two arms' trainable parameters differ beyond thinking; empty when they are matched (or unknown)."""
    if tim not in groups or baseline not in groups:
        return []
    return [f"{group}: {tim} trains {groups[tim][group]['trainable']:,}, {baseline} trains {groups[baseline][group]['trainable']:,}"
            for group in MATCHED_GROUPS if groups[tim][group]["trainable"] != groups[baseline][group]["trainable"]]


def variant_metrics(per_chip: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and seed: test metrics from the summed confusion of all test chips."""
    rows = []
    for (variant, seed), group in per_chip.groupby(["variant", "seed"]):
        m = metrics_from_confusion(group[CM_COLUMNS].to_numpy().sum(0).reshape(NUM_CLASSES, NUM_CLASSES))
        rows.append({"variant": variant, "seed": seed, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
                     "macro_f1": m["macro_f1"], **{f"iou_{c}": m["iou"][c] for c in CLASS_NAMES}})
    return pd.DataFrame(rows)


def compare(per_chip: pd.DataFrame, n_boot: int = 2000, publish_rule: str = "delta_and_interval",
            parameters: Mapping[str, Mapping] | None = None) -> dict:
    """Every comparison (and control) both sides of which were tested: mean delta over seeds, seed spread,
    parent-level intervals, per-fold deltas, whether the arms train the same parameters, and the seed's gate.

    ``parameters`` (from :func:`arm_parameters`) marks a comparison whose arms train different parameters
    (e.g. upstream TiM's frozen input embeddings against a baseline that trains them): it is reported with the
    difference and never published. Controls (freezing alone) get no verdict.
    """

    table = variant_metrics(per_chip)
    result = {}
    for tim, base in (*COMPARISONS, *CONTROLS):
        if not (set(table.loc[table.variant == tim, "seed"]) & set(table.loc[table.variant == base, "seed"])):
            continue
        stats = with_gate(paired_bootstrap(per_chip, tim, base, n_boot=n_boot), publish_rule)
        means = table[table.seed.isin(stats["seeds"])].groupby("variant")["miou"].mean()
        differences = unmatched(parameters or {}, tim, base)
        entry = {"tim": tim, "baseline": base, "kind": "control" if (tim, base) in CONTROLS else "thinking",
                 "tim_miou": float(means[tim]), "baseline_miou": float(means[base]), **stats,
                 "per_fold_delta_pp": per_fold_deltas(per_chip, tim, base, stats["seeds"]),
                 "matched": not differences, "unmatched": differences}
        if differences or entry["kind"] == "control":
            entry.update(publish=False, verdict="control (no gate)" if entry["kind"] == "control" else entry["verdict"])
        result[f"{tim}_vs_{base}"] = entry
    return result


def comparison_warnings(name: str, c: Mapping) -> list[str]:
    """What a reader must know before reading a comparison's verdict (one sentence each)."""
    problems = []
    if not c.get("matched", True):
        problems.append(f"{name}: the arms train different parameters ({'; '.join(c['unmatched'])}), so the delta mixes "
                        "thinking with that difference; read the matched comparison instead.")
    if c.get("few_parents"):
        problems.append(f"{name}: only {c['n_parents']} test parents carry the intervals; a cluster bootstrap is too narrow "
                        "with so few, read the parent t-interval and the sign-flip p.")
    if not c.get("interval_excludes_zero"):
        problems.append(f"{name}: Δ {c['delta_miou_pp']:+.2f} pp, but its intervals include 0 or could not be computed "
                        f"({c['n_seeds']} seed(s), {c['n_parents']} test parents): no evidence either way.")
    return problems


def per_fold_deltas(per_chip: pd.DataFrame, tim: str, baseline: str, seeds) -> dict[str, float]:
    """mIoU delta (pp, mean over ``seeds``) on each fold's own test parents; empty for the fixed split."""
    if "fold" not in per_chip or per_chip["fold"].isna().all():
        return {}
    rows = per_chip[per_chip.seed.isin(seeds) & per_chip.variant.isin([tim, baseline])]
    miou = {key: metrics_from_confusion(group[CM_COLUMNS].to_numpy().sum(0).reshape(NUM_CLASSES, NUM_CLASSES))["miou"]
            for key, group in rows.groupby(["fold", "variant", "seed"])}
    folds = sorted({int(f) for f, _, _ in miou})
    return {str(f): float(np.mean([miou[(f, tim, s)] - miou[(f, baseline, s)] for s in seeds
                                   if (f, tim, s) in miou and (f, baseline, s) in miou]) * 100) for f in folds}


def per_chip_gain(per_chip: pd.DataFrame, tim: str, baseline: str) -> pd.DataFrame:
    """Per test chip: mIoU of ``tim`` minus ``baseline`` in pp, each pooled over the seeds both ran."""
    seeds = set(per_chip.loc[per_chip.variant == tim, "seed"]) & set(per_chip.loc[per_chip.variant == baseline, "seed"])
    pooled = per_chip[per_chip.seed.isin(seeds)].groupby(["variant", "chip_id"])[CM_COLUMNS].sum()

    def chip_miou(variant: str) -> pd.Series:
        return pooled.loc[variant].apply(lambda row: metrics_from_confusion(row.to_numpy().reshape(NUM_CLASSES, NUM_CLASSES))["miou"], axis=1)

    gain = (chip_miou(tim) - chip_miou(baseline)) * 100
    return gain.rename("gain_pp").reset_index()
