"""The chain behind ``python -m nycdata run`` and ``make demo``.

Prepare the dataset (generate the fixture when the params ask for it) and
validate it, execute the notebooks with papermill into
``output_root/run_name/notebooks/``, render each to ``html/`` and write
``summary.md``. The same parameters reach every notebook.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import yaml

from nycdata import chips
from nycdata.params import resolve_path


def prepare_dataset(params: Mapping, log: Callable[[str], None] = print, validate: bool = True) -> Path:
    """Return the dataset directory of ``params`` (validated unless told not to), generating the fixture if asked to."""
    from nycdata.fixture import FixtureConfig, ensure_fixture
    from nycdata.validate import validate_dataset

    data_root = resolve_path(params["data_root"])
    if params["fixture"]:
        config = FixtureConfig(chips=params["fixture_chips"], size=params["fixture_size"],
                               timesteps=params["timesteps"], seed=params["fixture_seed"])
        ensure_fixture(data_root, config)
        log(f"dataset: fixture at {data_root}")
    elif not (data_root / chips.SPEC_FILE).is_file():
        raise FileNotFoundError(
            f"data_root {data_root} holds no chip dataset. Build it from real sources "
            "(`python -m nycdata build`, see README) or run with `-f params/fixture.yaml`."
        )
    if not validate:
        return data_root
    problems = validate_dataset(data_root)
    if problems:
        listing = "\n  ".join(map(str, problems[:20]))
        raise ValueError(f"dataset {data_root} failed validation ({len(problems)} problems):\n  {listing}")
    log(f"dataset: {data_root} validated")
    return data_root


NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_steps(params: Mapping) -> list[tuple[str, dict]]:
    """The chain: 01, 02, 03 once per variant, 04, and 05 when a LULC-thinking ``tim`` run is part of it."""
    from nycdata.variants import get_variant

    variants = [get_variant(v).name for v in params["variants"]]
    steps = [("01_load_data", {}), ("02_smoke", {})]
    steps += [("03_finetune", {"variant": v}) for v in variants]
    steps.append(("04_evaluate", {}))
    if "tim" in variants:
        steps.append(("05_visualise_tim", {}))
    return steps


def execute_notebook(name: str, out_dir: Path, parameters: Mapping, suffix: str = "") -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``out_dir``; return the executed copy."""
    import logging

    import papermill

    # every notebook gets the whole (already checked) parameter set; papermill would warn about each name a
    # notebook's parameters cell does not list, although nycdata.notebook accepts every known parameter
    logging.getLogger("papermill").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}{suffix}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), parameters=dict(parameters),
                               progress_bar=False, log_output=False, kernel_name="python3")
    return out


def render_html(notebook: Path, html_dir: Path) -> Path:
    """Render an executed notebook to standalone HTML (images embedded), viewable without Jupyter."""
    import nbformat
    from nbconvert import HTMLExporter

    html_dir.mkdir(parents=True, exist_ok=True)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    out = html_dir / f"{notebook.stem}.html"
    out.write_text(body, encoding="utf-8")
    return out


def run_pipeline(params: Mapping, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run every notebook of the chain for ``params`` into ``output_root/run_name``, then write ``summary.md``.

    An existing run folder is an error unless ``overwrite``, which deletes it first.
    """
    from nycdata.report import write_summary

    root = resolve_path(params["output_root"]) / params["run_name"]
    steps = notebook_steps(params)  # unknown variants fail before anything runs
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {root} already exists; choose another run_name or pass --overwrite")
        shutil.rmtree(root)
    prepare_dataset(params, log)
    html, started = [], time.monotonic()
    for i, (name, extra) in enumerate(steps, start=1):
        suffix = f"_{extra['variant']}" if "variant" in extra else ""
        log(f"[{i}/{len(steps)}] {name}{suffix} ({time.monotonic() - started:.0f} s elapsed)")
        executed = execute_notebook(name, root / "notebooks", {**params, **extra}, suffix)
        html.append(render_html(executed, root / "html"))
    (root / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=True))
    summary = write_summary(root, dict(params), html)
    log(f"wrote {summary}")
    return root
