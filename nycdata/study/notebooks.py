"""Running the notebooks: papermill into a run folder (a fresh kernel each, or one :class:`SharedKernel`), nbconvert
to standalone HTML.

Light on purpose (papermill and nbconvert are imported when used): a launcher's job process imports this module to
run one notebook, and the notebook's own kernel imports terratorch and Lightning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from nycdata.params import REPO_ROOT, non_default

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# This interpreter's own kernel (ipykernel's built-in spec), so a run never depends on which kernels are registered;
# JupyterLab opens the notebooks on the registered "nycdata" kernel named in their metadata, the same interpreter.
KERNEL = "python3"
KERNEL_FOLDER_PREFIX = "nycdata-kernel-"


def execute_notebook(name: str, out_dir: Path, parameters: Mapping, suffix: str = "",
                     kernel: "SharedKernel | None" = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``out_dir``; return the executed copy.

    Only the parameters that differ from params/nyc.yaml are injected: the notebook's parameters cell holds the
    defaults, so the injected cell shows a reader exactly what this run chose.

    A fresh kernel per notebook, unless ``kernel`` (a :class:`SharedKernel`) is given: then the notebook runs in that
    kernel, after it was reset."""
    import logging

    import papermill

    # papermill would warn about each injected name a notebook's parameters cell does not list, although
    # nycdata.notebook accepts every known parameter
    logging.getLogger("papermill").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}{suffix}.ipynb"
    km = kernel_manager() if kernel is None else kernel.reset()
    try:
        papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), parameters=non_default(parameters),
                                   progress_bar=False, log_output=False, kernel_name=KERNEL, km=km)
    finally:
        if kernel is None:  # papermill shuts down only kernels whose manager it created
            shutdown(km)
    return out




def kernel_manager(kernel_name: str = KERNEL):
    """A kernel manager whose kernel talks over IPC: Unix sockets in a private temporary folder (mode 0700, on local
    disk, a short path within the socket-name limit), removed at :func:`shutdown`.

    Over TCP, ipykernel warns at every start that the transport is unencrypted; sockets only this user can open
    are both quieter and safer."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class HeadlessKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            # a chain started from a JupyterLab kernel inherits the variable by which nycdata.console recognises a
            # live frontend; the notebooks it executes have none, so their progress must be plain lines, not widgets
            env = dict(kw.pop("env", None) or os.environ)
            env.pop("JPY_SESSION_NAME", None)
            return await super().start_kernel(env=env, **kw)

    folder = Path(tempfile.mkdtemp(prefix=KERNEL_FOLDER_PREFIX))
    return HeadlessKernelManager(kernel_name=kernel_name, transport="ipc", connection_file=str(folder / "kernel.json"))


def shutdown(km) -> None:
    """Stop ``km``'s kernel, if it has one, and remove its socket folder."""
    if km.has_kernel:
        from jupyter_core.utils import run_sync

        run_sync(km.shutdown_kernel)(now=True)
    folder = Path(km.connection_file).parent
    if folder.name.startswith(KERNEL_FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


# Run before each notebook in a shared kernel: a notebook must not see its predecessor's names, cell numbers,
# figures or "warn once" memory (each module's __warningregistry__, nycdata.console's), only the imported modules.
_RESET_KERNEL = """
import sys
import matplotlib.pyplot
matplotlib.pyplot.close("all")
for module in list(sys.modules.values()):
    if isinstance(getattr(module, "__dict__", None), dict) and isinstance(module.__dict__.get("__warningregistry__"), dict):
        module.__dict__["__warningregistry__"].clear()
if "nycdata.console" in sys.modules:
    sys.modules["nycdata.console"].forget_warnings()
get_ipython().reset(new_session=True)
__import__("gc").collect()
"""


class SharedKernel:
    """One Jupyter kernel that runs a chain's notebooks in turn, reset (names, cell numbers, figures, warning memory) before each: the
    notebooks import terratorch and Lightning once instead of once each (~10 s per notebook on 2 cores). Imported
    modules and their state stay, so the default (and the GPU box) keeps a fresh kernel per notebook.
    """

    def __init__(self, kernel_name: str = KERNEL):
        self.km = kernel_manager(kernel_name)

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
        shutdown(self.km)


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
