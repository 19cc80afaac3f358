"""Running the notebooks: papermill into a run folder (a fresh kernel each, or one :class:`SharedKernel`), nbconvert
to standalone HTML.

Light on purpose (papermill and nbconvert are imported when used): a launcher's job process imports this module to
run one notebook, and the notebook's own kernel imports terratorch and Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from nycdata.params import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def execute_notebook(name: str, out_dir: Path, parameters: Mapping, suffix: str = "",
                     kernel: "SharedKernel | None" = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``out_dir``; return the executed copy.

    A fresh kernel per notebook, unless ``kernel`` (a :class:`SharedKernel`) is given: then the notebook runs in that
    kernel, after it was reset."""
    import logging

    import papermill

    # every notebook gets the whole (already checked) parameter set; papermill would warn about each name a
    # notebook's parameters cell does not list, although nycdata.notebook accepts every known parameter
    logging.getLogger("papermill").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}{suffix}.ipynb"
    shared = {} if kernel is None else {"km": kernel.reset()}
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), parameters=dict(parameters),
                               progress_bar=False, log_output=False, kernel_name="python3", **shared)
    return out


# Run before each notebook in a shared kernel: a notebook must not see its predecessor's names, cell numbers,
# figures or "warn once per location" memory (each module's __warningregistry__), only the imported modules.
_RESET_KERNEL = """
import sys
import matplotlib.pyplot
matplotlib.pyplot.close("all")
for module in list(sys.modules.values()):
    if isinstance(getattr(module, "__dict__", None), dict) and isinstance(module.__dict__.get("__warningregistry__"), dict):
        module.__dict__["__warningregistry__"].clear()
get_ipython().reset(new_session=True)
__import__("gc").collect()
"""


class SharedKernel:
    """One Jupyter kernel that runs a chain's notebooks in turn, reset (names, cell numbers, figures, warning memory) before each: the
    notebooks import terratorch and Lightning once instead of once each (~10 s per notebook on 2 cores). Imported
    modules and their state stay, so the default (and the GPU box) keeps a fresh kernel per notebook.
    """

    def __init__(self, kernel_name: str = "python3"):
        from jupyter_client.manager import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name=kernel_name)

    def reset(self):
        """The kernel manager, its kernel reset (papermill starts the kernel with the first notebook)."""
        if self.km.has_kernel:
            import nbformat
            from nbclient import NotebookClient

            notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_RESET_KERNEL)])
            NotebookClient(notebook, km=self.km).execute()
        return self.km

    def __enter__(self) -> "SharedKernel":
        return self

    def __exit__(self, *exc) -> None:
        if self.km.has_kernel:
            from jupyter_core.utils import run_sync

            run_sync(self.km.shutdown_kernel)(now=True)


def render_html(notebook: Path, html_dir: Path) -> Path:
    """Render an executed notebook to standalone HTML (images embedded), viewable without Jupyter; an HTML file newer
    than its notebook is kept (a resumed study re-renders only what ran)."""
    out = html_dir / f"{notebook.stem}.html"
    if out.is_file() and out.stat().st_mtime_ns >= notebook.stat().st_mtime_ns:
        return out
    import nbformat
    from nbconvert import HTMLExporter

    html_dir.mkdir(parents=True, exist_ok=True)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    out.write_text(body, encoding="utf-8")
    return out
