"""Supplementary material, the model card and the (dry-run by default) Hugging Face upload of a run.

``supplement/`` (and ``supplement.zip``) is self-contained and viewable offline
without Jupyter: rendered notebooks, ``summary.md``, ``results.csv``,
``comparison.json``, figures, the exact params, package versions and the card.
Its front page is ``index.html``: the summary rendered, with relative links to
everything in the folder and to the card rendered as ``MODEL_CARD.html``, so a
browser is all a reviewer needs, from the unzipped archive on any machine.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

import yaml

from nycdata.data.classes import CLASSES
from nycdata.io import replace_dir_atomically
from nycdata.runs import CellLayout, RunLayout
from nycdata.study.evaluate import finished_runs
from nycdata.study.report import is_missing, markdown_page, write_index
from nycdata.study.stats import interval_text

CARD_FILE = "MODEL_CARD.md"
CARD_PAGE = "MODEL_CARD.html"
VERSIONS_FILE = "versions.json"
COPIED = ("summary", "results", "comparison", "per_chip", "data_summary", "smoke", "thoughts", "params_file")  # RunLayout
VERSIONED = ("torch", "terratorch", "torchgeo", "lightning", "torchmetrics", "rasterio", "geopandas", "numpy",
             "papermill", "huggingface_hub", "nycdata")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run the study first (`python -m nycdata study -f PARAMS`)")
    return path


def _verdict_text(name: str, c: Mapping) -> str:
    """One comparison's verdict in the report's words: a missing interval reads as in summary.md, never as NaN."""
    n = c["n_parents"]
    delta = c.get("delta_miou_pp_rounded", c["delta_miou_pp"])
    p = c.get("sign_flip_p")
    sign_flip = "" if is_missing(p) else f", sign-flip p {p:.3g} over {n} test parent{'' if n == 1 else 's'}"
    excludes = "exclude 0" if c.get("interval_excludes_zero", c["ci_excludes_zero"]) else "do not both exclude 0"
    return (f"{name}: {delta:+.2f} pp, 95 % CI bootstrap {interval_text(c['ci95_pp'], n)}, parent t-interval "
            f"{interval_text(c.get('parent_t_ci95_pp'), n)}{sign_flip} (intervals {excludes}), {c['verdict']}, "
            f"publish={c['publish']}" + (f" (rule {c['publish_rule']})" if "publish_rule" in c else ""))


def model_card(root: Path, params: Mapping) -> str:
    """A Hugging Face model card: model, data, classes, splits, metrics with CIs, limitations, how to reproduce."""
    layout = RunLayout(Path(root))
    comparison = json.loads(_require(layout.comparison).read_text())
    data = json.loads(_require(layout.data_summary).read_text())
    summary = _require(layout.summary).read_text(encoding="utf-8")
    verdicts = "; ".join(_verdict_text(n, c) for n, c in comparison.items())
    front = {"library_name": "terratorch", "license": "apache-2.0", "pipeline_tag": "image-segmentation",
             "tags": ["terramind", "thinking-in-modalities", "land-cover", "new-york-city", "sentinel-2", "sentinel-1"]}
    classes = "\n".join(f"| {c.index} | {c.name} | {', '.join(map(str, c.worldcover_codes))} |" for c in CLASSES)
    splits = ", ".join(f"{s}: {v['chips']} chips / {v['parents']} parents" for s, v in data["splits"].items())
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# TerraMind TiM on NYC land cover (`{params['run_name']}`)

**Result:** {verdicts}. A negative or inconclusive result is published as such.

## Model
`terramind_v1_{params['model_size']}` (plain and `_tim`) fine-tuned with terratorch's `SemanticSegmentationTask`:
temporal concat over {params['timesteps']} timesteps, UNet decoder, cross-entropy, AdamW lr {params['lr']},
ReduceLROnPlateau, early stopping; pretrained={params['pretrained']}.

## Data
{data['n_chips']} chips of {data['chip_size']} px from {data['n_parents']} parent scenes, split by parent ({splits}).
Inputs Sentinel-2 L2A (12 bands), Sentinel-1 RTC (VV, VH in dB), DEM; labels ESA WorldCover 2021 mapped to:

| class | name | WorldCover codes |
|---|---|---|
{classes}

## Metrics
{summary.split("## Test metrics", 1)[-1].split("## Notebooks", 1)[0].strip()}

## Limitations
- Few test parents: chips of one scene are correlated, so CIs resample parents; they are wide.
- TerraMind's LULC class order is the one documented on its LULC tokenizer's model card (ESRI legend); thought-vs-truth agreement maps it to our 5 classes with our own crosswalk (flooded vegetation -> water, crops and rangeland -> herbaceous), which is a judgement.
- pretrained=false runs (the fixture) test the pipeline only; their numbers say nothing about TerraMind.

## Reproduce
```bash
make test
python -m nycdata download-weights -f params/nyc.yaml -p variant tim
python -m nycdata study -f params/nyc.yaml
python -m nycdata supplement -f params/nyc.yaml
```
"""


def card_page(card: str, run_name: str) -> str:
    """The model card as a standalone HTML page; its YAML front matter (Hugging Face's metadata) shown as code at the end."""
    _, front, body = card.split("---\n", 2) if card.startswith("---\n") else ("", "", card)
    metadata = f"\n## Hugging Face metadata\n\n```yaml\n{front}```\n" if front else ""
    return markdown_page(body + metadata, f"Model card: run {run_name}")


def supplement_front(summary: str, params: Mapping) -> str:
    """The supplement's front page in Markdown: what the folder is, the card and versions first, then the summary."""
    heading, _, rest = summary.partition("\n")
    params_file = RunLayout.of(params).params_file.name
    intro = (f"Supplementary material of run `{params['run_name']}`: the [model card]({CARD_PAGE}) "
             f"([Markdown]({CARD_FILE})), the [package versions]({VERSIONS_FILE}) and the "
             f"[exact parameters]({params_file}) of the run; the rest of the folder is listed at the end of this page.")
    return "\n".join([heading, "", intro, rest])


def build_supplement(params: Mapping, log: Callable[[str], None] = print) -> Path:
    """Pack ``supplement/`` and ``supplement.zip`` next to the run's results, ``index.html`` as the front page."""
    layout = RunLayout.of(params)
    root = layout.root
    with replace_dir_atomically(layout.supplement, overwrite=True) as tmp:
        for path in (getattr(layout, name) for name in COPIED):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        for folder in (layout.html, layout.figures):
            if folder.is_dir():
                shutil.copytree(folder, tmp / folder.name)
        (tmp / VERSIONS_FILE).write_text(json.dumps(package_versions(), indent=2) + "\n")
        card = model_card(root, params)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        (tmp / CARD_PAGE).write_text(card_page(card, params["run_name"]), encoding="utf-8")
        summary = (tmp / layout.summary.name).read_text(encoding="utf-8")  # model_card required it
        write_index(tmp, supplement_front(summary, params), f"Run {params['run_name']}: supplementary material",
                    notes={CARD_FILE: "the model card (Hugging Face README)", CARD_PAGE: "the model card, rendered",
                           VERSIONS_FILE: "Python and package versions of the run"})
    archive = shutil.make_archive(str(layout.supplement_zip.with_suffix("")), "zip", layout.supplement)
    log(f"supplement: {layout.supplement} and {archive}")
    return layout.supplement


def upload_plan(params: Mapping, comparison_name: str = "tim_vs_baseline") -> list[tuple[Path, str]]:
    """(local file, path in the repo) to upload: the card and results, plus the TiM checkpoint when the gate says publish."""
    layout = RunLayout.of(params)
    root, supplement = layout.root, layout.supplement
    if not (supplement / CARD_FILE).is_file():
        raise FileNotFoundError(f"{supplement / CARD_FILE} missing: run `python -m nycdata supplement` first")
    copied = [supplement / layout.comparison.name, supplement / layout.results.name]  # as build_supplement copied them
    plan = [(supplement / CARD_FILE, "README.md"), *[(path, path.name) for path in copied]]
    comparison = json.loads(copied[0].read_text())[comparison_name]
    if comparison["publish"]:  # the first seed's model of every fold (cross-validation trains one per fold)

        seed = comparison["seeds"][0]
        for run in finished_runs(root):
            if run.variant == comparison["tim"] and run.seed == seed:
                fold = "" if run.fold is None else f"_fold{run.fold}"
                plan.append((CellLayout(run.path).best_checkpoint, f"{run.variant}{fold}_seed{seed}.ckpt"))
    return plan


def publish(params: Mapping, token: str | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Upload the plan to ``hf_repo_id``; a dry run (listing only) unless ``publish: true`` and a token are present."""
    plan = upload_plan(params)
    lines = [f"{local} -> {params['hf_repo_id'] or '<hf_repo_id unset>'}/{remote}" for local, remote in plan]
    if not (params["publish"] and token and params["hf_repo_id"]):
        log("dry run (set publish: true, hf_repo_id and a Hugging Face token to upload):\n  " + "\n  ".join(lines))
        return lines
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(params["hf_repo_id"], exist_ok=True)
    for local, remote in plan:
        api.upload_file(path_or_fileobj=str(local), path_in_repo=remote, repo_id=params["hf_repo_id"])
        log(f"uploaded {remote}")
    return lines
