"""The chain behind ``python -m nycdata run`` and ``make demo``.

Prepare the dataset (generate the fixture when the params ask for it) and
validate it, execute the notebooks with papermill into
``output_root/run_name/notebooks/``, render each to ``html/`` and write
``summary.md``. The same parameters reach every notebook.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import yaml

from nycdata.data.dataset import prepare_dataset
from nycdata.model.variants import get_variant
from nycdata.runs import RunLayout
from nycdata.study.notebooks import SharedKernel, execute_notebook, render_html
from nycdata.study.report import write_summary

@dataclass(frozen=True)
class Step:
    """One notebook execution of the chain; ``output`` (relative to the run folder) exists once it is done."""

    notebook: str
    parameters: dict
    output: str

    @property
    def label(self) -> str:
        return self.notebook + "".join(f"_{k}{v}" if k in ("seed", "fold") else f"_{v}" for k, v in self.parameters.items())


def notebook_steps(params: Mapping) -> list[Step]:
    """01, 02, 03 for every fold x seed x variant (the study grid), 04, and 05 when a LULC-thinking ``tim`` run is part of it."""
    variants = [get_variant(v).name for v in params["variants"]]
    seeds = list(params["seeds"])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds}: need at least one seed and no repeats")
    layout = RunLayout.of(params)
    output = lambda path: path.relative_to(layout.root).as_posix()  # noqa: E731 - a step's output, run-relative
    steps = [Step("01_load_data", {}, output(layout.data_summary)), Step("02_smoke", {}, output(layout.smoke))]
    for fold in range(params["cv_folds"]) if params["cv_folds"] else [None]:
        for seed in seeds:
            for variant in variants:
                cell = {"variant": variant, "seed": seed, **({"fold": fold} if fold is not None else {})}
                summary = layout.cell(variant, seed, fold).train_summary
                steps.append(Step("03_finetune", cell, output(summary)))
    steps.append(Step("04_evaluate", {}, output(layout.comparison)))
    if "tim" in variants:
        steps.append(Step("05_visualise_tim", {"seed": seeds[0]}, output(layout.thoughts)))
    return steps


def run_pipeline(params: Mapping, overwrite: bool = False, resume: bool = False,
                 log: Callable[[str], None] = print, kernel: SharedKernel | None = None, launcher=None) -> Path:
    """Run the chain for ``params`` into ``output_root/run_name``, then write ``summary.md``.

    A fresh run refuses an existing run folder unless ``overwrite`` (which deletes it). With ``resume`` (the
    study) an existing folder is continued: finished steps are skipped, an interrupted fine-tune resumes from
    its ``last.ckpt``, and 04/05 run again only when a fine-tune ran. With a ``kernel`` (:class:`SharedKernel`) every
    notebook runs in that one kernel (faster on small runs; the default is a fresh kernel per notebook). A ``launcher``
    (:class:`nycdata.study.launch.Launcher`) runs the unfinished fine-tunes as concurrent jobs instead of one after
    another here; 04/05 then run once, after the last cell, and not at all when a cell failed.
    """
    layout = RunLayout.of(params)
    root = layout.root
    steps = notebook_steps(params)  # unknown variants or bad seeds fail before anything runs
    if root.exists() and any(root.iterdir()) and not resume:
        if not overwrite:
            raise FileExistsError(f"run folder {root} already exists; choose another run_name, pass --overwrite, "
                                  "or continue it with `python -m nycdata study`")
        shutil.rmtree(root)
    prepare_dataset(params, log)
    progress, trained = Progress(len(steps), log), False
    cells = [step for step in steps if step.notebook == "03_finetune"]
    for step in steps:
        if launcher is not None and step.notebook == "03_finetune":
            if step is cells[0]:  # the whole grid at once, as jobs
                todo = [cell for cell in cells if not (root / cell.output).is_file()]
                progress.launched(len(cells), len(todo))
                launcher.run_cells(params, todo, log)  # raises, naming each failed cell and its log
                trained = bool(todo)
            continue
        if resume and (root / step.output).is_file() and not (trained and step.notebook in ("04_evaluate", "05_visualise_tim")):
            progress.skip(step.label)
            continue
        progress.start(step.label)
        extra = {**step.parameters, "resume": resume} if step.notebook == "03_finetune" else step.parameters
        execute_notebook(step.notebook, layout.notebooks, {**params, **extra}, step.label[len(step.notebook):], kernel)
        trained |= step.notebook == "03_finetune"
        progress.done()
    html = [render_html(nb, layout.html) for nb in sorted(layout.notebooks.glob("*.ipynb"))]
    layout.params_file.write_text(yaml.safe_dump(dict(params), sort_keys=True))
    summary = write_summary(root, dict(params), html)
    log(f"wrote {summary}")
    return root


class Progress:
    """``[i/N] step (elapsed, ETA)`` lines; the ETA assumes remaining steps take the mean of those run so far."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.index, self.ran, self.started = total, log, 0, [], time.monotonic()
        self.step_started = self.started

    def _eta(self) -> str:
        if not self.ran:
            return "ETA unknown"
        return f"ETA {sum(self.ran) / len(self.ran) * (self.total - self.index + 1):.0f} s"

    def start(self, label: str) -> None:
        self.index += 1
        self.step_started = time.monotonic()
        self.log(f"[{self.index}/{self.total}] {label} ({time.monotonic() - self.started:.0f} s elapsed, {self._eta()})")

    def skip(self, label: str) -> None:
        self.index += 1
        self.log(f"[{self.index}/{self.total}] {label}: already done, skipped")

    def launched(self, cells: int, todo: int) -> None:
        first = self.index + 1
        self.index += cells
        self.log(f"[{first}-{self.index}/{self.total}] the grid's {cells} fine-tunes: {cells - todo} already done, "
                 f"{todo} launched")

    def done(self) -> None:
        self.ran.append(time.monotonic() - self.step_started)
