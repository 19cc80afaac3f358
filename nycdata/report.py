"""``summary.md``: the results table, the gate verdicts and links to the rendered notebooks of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from nycdata.classes import CLASS_NAMES
from nycdata.evaluate import COMPARISON_FILE, PER_CHIP_FILE, variant_metrics

SUMMARY_FILE = "summary.md"
RESULTS_FILE = "results.csv"


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
    lines = ["| comparison | seeds | test chips (parents) | Δ mIoU (pp) | 95 % CI (pp) | seed std (pp) | CI excludes 0 | verdict | publish |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in comparison.items():
        lo, hi = c["ci95_pp"]
        ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo == lo else f"none ({c['n_parents']} test parent)"  # NaN: too few parents
        lines.append(f"| {name} | {c['n_seeds']} | {c['n_test_chips']} ({c['n_parents']}) | {c['delta_miou_pp']:+.2f} | "
                     f"{ci} | {c['seed_std_pp']:.2f} | {'yes' if c['ci_excludes_zero'] else 'no'} | "
                     f"{c['verdict']} | {'yes' if c['publish'] else 'no'} |")
    return "\n".join(lines)


def write_figures(root: Path, per_chip: pd.DataFrame, comparison: dict) -> list[Path]:
    """Forest plot, per-class deltas and (when 05 ran) per-chip TiM gain against thought agreement."""
    import matplotlib.pyplot as plt

    from nycdata import plots
    from nycdata.evaluate import per_chip_gain

    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    made = {"forest.png": plots.forest(comparison), "per_class_delta.png": plots.per_class_delta(comparison)}
    agreement_file = root / "thoughts_per_chip.csv"
    if agreement_file.is_file() and "tim_vs_baseline" in comparison:
        points = per_chip_gain(per_chip, "tim", "baseline").merge(pd.read_csv(agreement_file), on="chip_id")
        made["gain_vs_thought_agreement.png"] = plots.gain_vs_agreement(points)
    for name, fig in made.items():
        fig.savefig(figures / name, dpi=110)
        plt.close(fig)
    return [figures / name for name in made]


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
    results = results_table(per_chip)
    results.to_csv(root / RESULTS_FILE, index=False)
    figures = write_figures(root, per_chip, comparison) if comparison else []
    parts += ["## Test metrics (mean ± std over seeds)", "", markdown_results(results), "",
              "## TiM vs baseline (gate: strong > +2 pp, acceptable 0..+2 pp, negative < 0; publish if >= +1 pp)", "",
              "95 % CI: paired bootstrap over test parents and seeds. A verdict whose CI includes 0 is not evidence of an effect.", "",
              markdown_comparison(comparison), "", *[f"![{f.stem}]({f.relative_to(root).as_posix()})" for f in figures],
              "", "## Notebooks", ""]
    parts += [f"- [{f.stem}]({f.relative_to(root).as_posix()})" for f in html_files]
    path = root / SUMMARY_FILE
    path.write_text("\n".join(parts) + "\n")
    return path
