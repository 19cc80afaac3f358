"""What every notebook does around its narrative: collect parameters, find its run folder, warn visibly.

A notebook's imports cell ends with ``_before = set(globals())``; its
derived-values cell calls ``P = notebook_params(globals(), _before)``. The
names defined since (the ``parameters`` cell and whatever papermill injected
after it) must all be known parameters: papermill only warns about a
misspelt ``-p varaint tim``, and this turns it into an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from nycdata.params import load_params
from nycdata.runs import run_root


def notebook_params(namespace: dict, before: set[str]) -> dict:
    """Defaults from params/nyc.yaml overridden by the notebook's parameter cells; unknown names fail.

    Warns visibly when these parameters let TiM think with random generator weights.
    """
    params = _collect(namespace, before)
    if params["allow_random_generator"] and not params["pretrained"]:
        warn("pretrained=false with allow_random_generator=true: every TiM thought in this run comes from a RANDOM "
             "generator and is noise; results test the pipeline, not TiM.")
    if params["tim_random_generator"]:
        warn("tim_random_generator=true: TiM thinks with a RANDOM generator on purpose, as the original experiment did; "
             "this run reproduces that defect and says nothing about TiM.")
    return params


def _collect(namespace: dict, before: set[str]) -> dict:
    """The names defined after ``before`` was taken, checked and merged over the defaults.

    The names are fixed the first time this runs, so re-running the cell in
    JupyterLab after later cells defined more variables still works.
    """
    names = namespace.get("_parameter_names")
    if names is None:
        names = [k for k in namespace if k not in before and not k.startswith("_")]
        namespace["_parameter_names"] = names
    return load_params(overrides={k: namespace[k] for k in names})


def run_dir(params: Mapping) -> Path:
    """``output_root/run_name``, created when missing."""
    path = run_root(params)
    path.mkdir(parents=True, exist_ok=True)
    return path


def warn(message: str) -> None:
    """A warning that shows in JupyterLab, in papermill logs and in the rendered HTML."""
    print(message, flush=True)
    try:
        from IPython.display import HTML, display

        display(HTML(f'<div style="border:3px solid #c00;padding:8px;color:#c00;font-weight:bold">{message}</div>'))
    except ImportError:  # pragma: no cover - IPython ships with the notebook stack
        pass
