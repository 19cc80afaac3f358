"""``summary.md`` and ``index.html``: the results table, the gate verdicts and links to everything a run wrote.

``index.html`` is ``summary.md`` rendered to one standalone page (relative links only, so it opens from a copied or
unzipped folder on any machine) plus a list of every notebook, figure and data file in the folder.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from nycdata.data.classes import CLASS_NAMES
from nycdata.io import atomic_write_text
from nycdata.runs import RunLayout
from nycdata.study import plots
from nycdata.study.evaluate import per_chip_gain, variant_metrics
from nycdata.study.stats import FEW_PARENTS, PUBLISH_RULES, check_publish_rule, interval_text

INDEX_FILE = "index.html"
# A tight box grown by a margin keeps titles, legends and labels that stick out of the layout inside the image.
SAVEFIG_OPTIONS = {"dpi": 110, "bbox_inches": "tight", "pad_inches": 0.1}
PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.5;
       max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #999; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img { max-width: 100%; height: auto; }
code, pre { background: #f6f6f6; }
pre { padding: 0.5rem; overflow-x: auto; }
a.anchor-link { visibility: hidden; text-decoration: none; margin-left: 0.3rem; }
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link { visibility: visible; }
"""


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


COMPARISON_COLUMNS = ["kind", "matched", "n_seeds", "n_parents", "n_test_chips", "baseline_miou", "tim_miou",
                      "delta_miou_pp", "ci95_pp", "parent_t_ci95_pp", "sign_flip_p", "seed_std_pp", "verdict", "publish"]


def comparison_frame(comparison: dict) -> pd.DataFrame:
    """The comparisons as a table for a notebook, intervals in the words of summary.md and the model card."""
    frame = pd.DataFrame(comparison).T.reindex(columns=COMPARISON_COLUMNS)
    for column in ("ci95_pp", "parent_t_ci95_pp"):
        frame[column] = [interval_text(c.get(column), c["n_parents"]) for c in comparison.values()]
    return frame


def is_missing(value) -> bool:
    """None, or NaN as results of older runs hold it: printed as missing, never as "nan"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _sign_flip_text(c: dict) -> str:
    """p with what it could have been at best: with 4 parents, 0.125 is the smallest p there is."""
    p = c.get("sign_flip_p")
    if is_missing(p):
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
        deltas = c.get("per_fold_delta_pp", {})
        cells = ["–" if is_missing(deltas.get(f)) else f"{deltas[f]:+.2f}" for f in folds]
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
        save_figure(fig, figures / name)
        plt.close(fig)
    return [figures / name for name in made]


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as the report's figures are saved: nothing drawn is cut off at the image's edge."""
    fig.savefig(path, **SAVEFIG_OPTIONS)
    return path


# --- index.html: the summary as a page a reviewer opens without a Markdown viewer or Jupyter

FILE_NOTES = {  # RunLayout attribute -> what the file holds, for the index's file list
    "results": "test metrics per variant (mean and std over seeds)",
    "comparison": "every comparison: deltas, intervals, sign-flip p, verdicts",
    "per_chip": "per test chip confusion matrices of every variant and seed (everything else derives from it)",
    "params_file": "the run's exact parameters",
    "data_summary": "chips, parents and splits of the data set",
    "folds": "cross-validation folds of the parents",
    "s2_medians": "Sentinel-2 band medians against TerraMind's pretraining statistics",
    "smoke": "the smoke test's result",
    "thoughts": "TiM thought agreement with the ground truth",
    "thoughts_per_chip": "thought agreement per test chip",
    "test_metrics": "test metrics of the run",
    "summary": "this page's Markdown source",
    "bench_json": "benchmark timings",
    "bench_md": "benchmark report",
    "supplement_zip": "the supplementary material, zipped",
}
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")


def _href(path: str) -> str:
    return quote(path, safe="/")


def files_section(folder: Path, markdown: str, notes: dict[str, str] | None = None) -> str | None:
    """Markdown list of every rendered notebook, figure and top-level file in ``folder`` that ``markdown`` does not
    link yet (relative links), or None when it links them all.

    ``notes``: file name -> what it holds, added to :data:`FILE_NOTES`' descriptions.
    """
    folder, layout = Path(folder), RunLayout(Path(folder))
    linked = {target.split("#", 1)[0] for target in _LINK_TARGET.findall(markdown)}
    notes = {**{getattr(layout, key).name: note for key, note in FILE_NOTES.items()}, **(notes or {})}
    # dot files are half-written temporaries of atomic writers, not results
    groups = [("Rendered notebooks", sorted(layout.html.glob("*.html"))),
              ("Figures", sorted(p for p in layout.figures.glob("*") if p.is_file() and not p.name.startswith("."))),
              ("Data and reports", sorted(p for p in folder.iterdir()
                                          if p.is_file() and p.name != INDEX_FILE and not p.name.startswith(".")))]
    lines = []
    for heading, paths in groups:
        items = [p.relative_to(folder).as_posix() for p in paths]
        items = [item for item in items if _href(item) not in linked and item not in linked]
        if items:
            lines += ["", f"{heading}:", ""]
            lines += [f"- [`{item}`]({_href(item)})" + (f": {notes[item]}" if item in notes else "") for item in items]
    return "\n".join(["## Files", *lines]) if lines else None


def markdown_page(markdown: str, title: str) -> str:
    """``markdown`` rendered to a standalone UTF-8 HTML page (the Markdown renderer nbconvert ships; tables included)."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune  # as render_html: only pages pay for nbconvert

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n<main>\n"
            f"{markdown2html_mistune(markdown)}\n</main>\n</body>\n</html>\n")


def write_index(folder: Path, markdown: str, title: str, notes: dict[str, str] | None = None) -> Path:
    """Write ``folder/index.html``: ``markdown`` and a list of whatever else ``folder`` holds, all linked relatively."""
    folder = Path(folder)
    files = files_section(folder, markdown, notes)
    page = markdown_page(markdown + ("\n\n" + files if files else ""), title)
    return atomic_write_text(folder / INDEX_FILE, page)


def write_summary(root: Path, params: dict, html_files: list[Path]) -> Path:
    """Write ``summary.md`` of the run at ``root`` from its ``per_chip.csv`` and ``comparison.json``, and the same
    rendered to ``index.html`` with links to every notebook, figure and data file of the run."""
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
    text = "\n".join(parts) + "\n"
    atomic_write_text(layout.summary, text)
    write_index(root, text, f"Run {params['run_name']}: summary")
    return layout.summary
