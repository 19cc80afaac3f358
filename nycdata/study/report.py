"""``summary.md``: the results table, the gate verdicts and links to the rendered notebooks of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from nycdata.data.classes import CLASS_NAMES
from nycdata.runs import RunLayout
from nycdata.study import plots
from nycdata.study.evaluate import per_chip_gain, variant_metrics
from nycdata.study.stats import FEW_PARENTS, PUBLISH_RULES, check_publish_rule, interval_text



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


def _sign_flip_text(c: dict) -> str:
    """p with what it could have been at best: with 4 parents, 0.125 is the smallest p there is."""
    p = c.get("sign_flip_p")
    if p is None:
        return "–"
    floor = f"min {c['sign_flip_min_p']:.3g}" if c.get("sign_flip_method") == "exact" else "Monte Carlo"
    return f"{p:.3g} ({floor})"


def markdown_comparison(comparison: dict) -> str:
    """One row per comparison: delta as decided (2 decimals), both intervals, sign-flip p, verdict and publish."""
    lines = ["| comparison | seeds | test chips (parents) | Δ mIoU (pp) | 95 % CI bootstrap (pp) | parent t-interval (pp) "
             "| sign-flip p | intervals exclude 0 | verdict | publish |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in comparison.items():
        n = c["n_parents"]
        delta = c.get("delta_miou_pp_rounded", c["delta_miou_pp"])
        excludes = c.get("interval_excludes_zero", c["ci_excludes_zero"])
        lines.append(f"| {name} | {c['n_seeds']} | {c['n_test_chips']} ({n}) | {delta:+.2f} | "
                     f"{interval_text(c['ci95_pp'], n)} | {interval_text(c.get('parent_t_ci95_pp'), n)} | "
                     f"{_sign_flip_text(c)} | {'yes' if excludes else 'no'} | {_verdict(c)} | "
                     f"{'yes' if c['publish'] else 'no'} |")
    return "\n".join(lines)


def _verdict(c: dict) -> str:
    """The gate's verdict, flagged when the arms train different parameters (then it is never published)."""
    return c["verdict"] + ("" if c.get("matched", True) else " (arms unmatched: " + "; ".join(c["unmatched"]) + ")")


def markdown_per_fold(comparison: dict) -> str | None:
    """Δ mIoU per fold (each fold's own test parents), one row per comparison; None for the fixed split."""
    folds = sorted({f for c in comparison.values() for f in c.get("per_fold_delta_pp", {})}, key=int)
    if not folds:
        return None
    lines = ["| comparison | " + " | ".join(f"fold {f}" for f in folds) + " |", "|---|" + "---|" * len(folds)]
    for name, c in comparison.items():
        cells = [f"{c['per_fold_delta_pp'][f]:+.2f}" if f in c.get("per_fold_delta_pp", {}) else "–" for f in folds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def few_parents_note(comparison: dict) -> str | None:
    """The warning sentence when any comparison rests on fewer than FEW_PARENTS test parents, else None."""
    few = sorted({(c["n_parents"], c.get("sign_flip_min_p")) for c in comparison.values() if c["n_parents"] < FEW_PARENTS},
                 key=lambda x: x[0])
    if not few:
        return None
    counts = ", ".join(str(n) for n, _ in few)
    floors = ", ".join(f"{p:.3g}" + (f" with {n}" if len(few) > 1 else "") for n, p in few if p is not None) or "n/a"
    return (f"**Fewer than {FEW_PARENTS} test parents ({counts}) carry these intervals: a cluster bootstrap is too "
            f"narrow with few clusters; read the parent t-interval and the sign-flip p "
            f"(smallest attainable p = {floors}).**")


def publish_rule_text(comparison: dict, params: dict) -> str:
    """The rule the verdicts were decided under (as recorded in comparison.json, else the run's parameter)."""
    rules = ({c["publish_rule"] for c in comparison.values() if "publish_rule" in c}
             or {params.get("publish_rule", "delta_and_interval")})
    return " ".join(f"Publish rule `{check_publish_rule(r)}`: {PUBLISH_RULES[r]}." for r in sorted(rules))


def write_figures(root: Path, per_chip: pd.DataFrame, comparison: dict) -> list[Path]:
    """Forest plot, per-class deltas and (when 05 ran) per-chip TiM gain against thought agreement."""
    import matplotlib.pyplot as plt

    figures = RunLayout(Path(root)).figures
    figures.mkdir(exist_ok=True)
    made = {"forest.png": plots.forest(comparison), "per_class_delta.png": plots.per_class_delta(comparison)}
    agreement_file = RunLayout(Path(root)).thoughts_per_chip
    if agreement_file.is_file() and "tim_vs_baseline" in comparison:
        points = per_chip_gain(per_chip, "tim", "baseline").merge(pd.read_csv(agreement_file), on="chip_id")
        made["gain_vs_thought_agreement.png"] = plots.gain_vs_agreement(points)
    for name, fig in made.items():
        fig.savefig(figures / name, dpi=110)
        plt.close(fig)
    return [figures / name for name in made]


def write_summary(root: Path, params: dict, html_files: list[Path]) -> Path:
    """Write ``summary.md`` of the run at ``root`` from its ``per_chip.csv`` and ``comparison.json``."""
    root, layout = Path(root), RunLayout(Path(root))
    per_chip = pd.read_csv(layout.per_chip)
    comparison = json.loads(layout.comparison.read_text())
    parts = [f"# Run `{params['run_name']}`", "",
             f"Model `terramind_v1_{params['model_size']}`, pretrained={params['pretrained']}, data `{params['data_root']}`, "
             f"{params['max_epochs']} epochs at most.", ""]
    if not params["pretrained"]:
        parts += ["**Random weights (pretrained=false): these numbers test the pipeline, not TerraMind or TiM.**", ""]
    if params["tim_random_generator"]:
        parts += ["**TiM thought with a random generator on purpose (`tim_random_generator`, the original experiment's "
                  "defect): its thoughts were noise. See the README's table of the original's defects.**", ""]
    results = results_table(per_chip)
    results.to_csv(layout.results, index=False)
    figures = write_figures(root, per_chip, comparison) if comparison else []
    parts += ["## Test metrics (mean ± std over seeds)", "", markdown_results(results), "",
              "## TiM vs baseline (gate: strong > +2 pp, acceptable 0..+2 pp, negative < 0; publish if >= +1 pp)", "",
              "Δ is decided as printed (2 decimals). 95 % CI bootstrap: paired, over test parents and seeds. "
              "Parent t-interval: Student-t interval of the mean per-parent paired delta; sign-flip p: paired "
              "permutation test over parents (two-sided). A verdict whose intervals include 0 is not evidence of an effect.",
              "", publish_rule_text(comparison, params), "",
              "Both arms of a comparison with one seed (and fold) start from the same decoder and head, see the same chips, "
              "D4 transforms and dropout, and train the same parameters apart from TiM's thought embedding; a comparison "
              "whose arms train different parameters says so in its verdict and is never published.", "",
              markdown_comparison(comparison), ""]
    note = few_parents_note(comparison)
    parts += [note, ""] if note else []
    per_fold = markdown_per_fold(comparison)
    parts += ["Δ mIoU (pp) per cross-validation fold, on each fold's own test parents:", "", per_fold, ""] if per_fold else []
    parts += [*[f"![{f.stem}]({f.relative_to(root).as_posix()})" for f in figures], "", "## Notebooks", ""]
    parts += [f"- [{f.stem}]({f.relative_to(root).as_posix()})" for f in html_files]
    path = layout.summary
    path.write_text("\n".join(parts) + "\n")
    return path
