"""``summary.md``: the results table, the gate verdicts and links to the rendered notebooks of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from nycdata.classes import CLASS_NAMES
from nycdata.evaluate import COMPARISON_FILE, PER_CHIP_FILE, variant_metrics

SUMMARY_FILE = "summary.md"


def results_table(per_chip: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean and std over seeds of mIoU, pixel accuracy, macro F1 and per-class IoU."""
    table = variant_metrics(per_chip)
    columns = ["miou", "pixel_accuracy", "macro_f1", *[f"iou_{c}" for c in CLASS_NAMES]]
    grouped = table.groupby("variant")[columns]
    out = grouped.mean().join(grouped.std(ddof=1).add_suffix("_std")).join(grouped.size().rename("n_seeds"))
    return out.reset_index()


def _mean_std(row, column: str) -> str:
    std = row.get(f"{column}_std")
    return f"{row[column]:.4f}" + (f" ± {std:.4f}" if pd.notna(std) else "")


def markdown_results(results: pd.DataFrame) -> str:
    header = "| variant | seeds | mIoU | pixel acc. | macro F1 | " + " | ".join(f"IoU {c}" for c in CLASS_NAMES) + " |"
    lines = [header, "|" + "---|" * (5 + len(CLASS_NAMES))]
    for _, row in results.iterrows():
        cells = [row["variant"], str(int(row["n_seeds"])), *(_mean_std(row, c) for c in ("miou", "pixel_accuracy", "macro_f1")),
                 *(f"{row[f'iou_{c}']:.4f}" for c in CLASS_NAMES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_comparison(comparison: dict) -> str:
    lines = ["| comparison | seeds | test chips | Δ mIoU (pp) | verdict | publish |", "|---|---|---|---|---|---|"]
    for name, c in comparison.items():
        lines.append(f"| {name} | {c['n_seeds']} | {c['n_test_chips']} | {c['delta_miou_pp']:+.2f} | {c['verdict']} | "
                     f"{'yes' if c['publish'] else 'no'} |")
    return "\n".join(lines)


def write_summary(root: Path, params: dict, html_files: list[Path]) -> Path:
    """Write ``summary.md`` of the run at ``root`` from its ``per_chip.csv`` and ``comparison.json``."""
    root = Path(root)
    per_chip = pd.read_csv(root / PER_CHIP_FILE)
    comparison = json.loads((root / COMPARISON_FILE).read_text())
    parts = [f"# Run `{params['run_name']}`", "",
             f"Model `terramind_v1_{params['model_size']}`, pretrained={params['pretrained']}, data `{params['data_root']}`, "
             f"{params['max_epochs']} epochs at most.", ""]
    if not params["pretrained"]:
        parts += ["**Random weights (pretrained=false): these numbers test the pipeline, not TerraMind or TiM.**", ""]
    parts += ["## Test metrics", "", markdown_results(results_table(per_chip)), "",
              "## TiM vs baseline (gate: strong > +2 pp, acceptable 0..+2 pp, negative < 0; publish if >= +1 pp)", "",
              markdown_comparison(comparison), "", "## Notebooks", ""]
    parts += [f"- [{f.stem}]({f.relative_to(root).as_posix()})" for f in html_files]
    path = root / SUMMARY_FILE
    path.write_text("\n".join(parts) + "\n")
    return path
