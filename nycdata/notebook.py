"""What every notebook does around its narrative: collect parameters, find its run folder, warn visibly.

A notebook's imports cell ends with ``_before = set(globals())``; its
derived-values cell calls ``P = notebook_params(globals(), _before)``. The
names defined since (the ``parameters`` cell and whatever papermill injected
after it) must all be known parameters: papermill only warns about a
misspelt ``-p varaint tim``, and this turns it into an error.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Mapping

from nycdata import console
from nycdata.data.dataset import DatasetInvalid, DatasetMissing
from nycdata.params import ParamError, Params, check_known, defaults, load_params
from nycdata.runs import run_root

PAPERMILL_HEADER = "# Parameters"  # the first line of the cell papermill injects after the parameters cell


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


def _collect(namespace: dict, before: set[str]) -> Params:
    """The names defined after ``before`` was taken, checked and merged over the defaults.

    With ``params_file`` set, that file is read over the defaults and only explicit parameters win over it: the
    names papermill injected (``-p``/``-f``) and values edited to differ from params/nyc.yaml. Values left at the
    parameters cell's printed defaults would otherwise undo the file, and "Run All" on the fixture would need
    twenty edits instead of one. The names are fixed the first time this runs, so re-running the cell in
    JupyterLab after later cells defined more variables still works.
    """
    names = namespace.get("_parameter_names")
    if names is None:
        names = [k for k in namespace if k not in before and not k.startswith("_")]
        namespace["_parameter_names"] = names
    check_known(names, "the notebook's parameters")
    values = {k: namespace[k] for k in names}
    if values.get("params_file"):
        nyc, injected = defaults(), _injected_names(namespace.get("In", ()))
        values = {k: v for k, v in values.items() if k == "params_file" or k in injected or v != nyc[k]}
    return load_params(overrides=values)


def _injected_names(inputs) -> set[str]:
    """Names assigned by papermill's injected cell, found in the kernel's input history (IPython's ``In``): the
    kernel has no other record of which values came from ``-p``/``-f`` rather than the parameters cell."""
    names: set[str] = set()
    for source in inputs:
        if source.startswith(PAPERMILL_HEADER + "\n"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            names |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                      for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    return names


def run_dir(params: Mapping) -> Path:
    """``output_root/run_name``, created when missing."""
    path = run_root(params)
    path.mkdir(parents=True, exist_ok=True)
    return path


def warn(message: str) -> None:
    """A warning that shows once, as one red box in JupyterLab and the rendered HTML and as text in papermill logs."""
    console.warn(message)


# Errors that are the user's to fix (a missing dataset, a wrong parameter) carry a message saying how; in a notebook
# they show as that one message, not a traceback through the package. The cell still fails, so Run All and papermill
# stop there.
USER_ERRORS = (ParamError, DatasetMissing, DatasetInvalid)


def _one_message(shell, etype, value, tb, tb_offset=None) -> list[str]:
    message = [f"{etype.__name__}: {value}"]
    shell._showtraceback(etype, value, message)  # IPython leaves showing a custom handler's traceback to it
    return message


def _show_user_errors_briefly() -> None:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the notebook stack
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc(USER_ERRORS, _one_message)


_show_user_errors_briefly()
