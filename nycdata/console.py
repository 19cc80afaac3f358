"""What a person watching a run sees: deliberate warnings, once each, and progress that suits where the code runs.

The notebooks run two ways. Headless (papermill, nbclient, a launcher's job), every output is kept in the
executed ``.ipynb``, rendered to HTML and read later, so it must be plain text on stdout: a progress widget would
be a dead ``application/vnd.jupyter.widget-view+json`` blob there, and anything on stderr shows as a red block that
hides the few lines that matter. Live in JupyterLab, a widget bar is what a person wants. A kernel that a Jupyter
server started has ``JPY_SESSION_NAME`` in its environment (jupyter_server sets it, papermill's kernels lack it):
that, an IPython ZMQ shell and an importable ipywidgets decide which (:func:`live_frontend`).

A bottom layer: only the standard library here (IPython and tqdm are imported when used), so every layer may call it.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import logging
import os
import sys
import time
import warnings
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

WARNING_STYLE = "border:3px solid #c00;padding:8px;color:#c00;font-weight:bold"

_shown: set[str] = set()  # messages warn() has shown in this process


def warn(message: str, stacklevel: int = 1) -> bool:
    """Show a deliberate warning, once per process and message; return whether it was shown now.

    In an IPython kernel it is one ``display_data`` output carrying ``text/html`` (a red box, what the rendered HTML
    and JupyterLab show) and ``text/plain`` (the message, what papermill's log and plain viewers show). Elsewhere it
    is a ``UserWarning`` attributed to the caller's ``stacklevel`` frame (1: the caller of ``warn``), so the CLI's
    stderr and ``pytest.warns`` see it. Calling it again with the same text shows nothing until
    :func:`forget_warnings`: one fact, however many code paths find it, is said once.
    """
    if message in _shown:
        return False
    _shown.add(message)
    publisher = getattr(_ipython(), "display_pub", None)
    if publisher is None:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
    else:
        publisher.publish(data=warning_bundle(message), metadata={})
    return True


def warning_bundle(message: str) -> dict[str, str]:
    """The MIME bundle :func:`warn` displays: the message as ``text/plain`` and as a red ``text/html`` box."""
    return {"text/plain": message, "text/html": f'<div style="{WARNING_STYLE}">{html.escape(message)}</div>'}


def forget_warnings() -> None:
    """Let :func:`warn` show every message again (a kernel reused for another notebook calls this between them)."""
    _shown.clear()


def _ipython():
    """The running IPython shell, or None (IPython is never imported here: a plain process has no shell)."""
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None


def live_frontend() -> bool:
    """True when a person watches this kernel in JupyterLab (or Notebook), where a progress widget renders.

    ``JPY_SESSION_NAME`` is set by jupyter_server for the kernels it starts; kernels of papermill and nbclient
    (headless runs) lack it. A kernel started from inside a Lab kernel inherits its environment, so whoever starts
    headless kernels from such a process must leave that variable out of their environment.
    """
    if not os.environ.get("JPY_SESSION_NAME"):
        return False
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    if zmqshell is None or not isinstance(_ipython(), zmqshell.ZMQInteractiveShell):
        return False
    return importlib.util.find_spec("ipywidgets") is not None


def _print(line: str) -> None:
    print(line, flush=True)


class Progress:
    """Progress of ``total`` units of work: a tqdm widget under a live frontend, else plain lines on ``log``.

    Plain lines (``desc: 40/128 chips (31 %), 12 s elapsed, ETA 26 s``) come at most every ``every_s`` seconds, so
    a short step prints none, and one final line when it closes (``final``; a caller that logs its own summary line
    turns it off). Never writes to stderr. ``done`` and :meth:`elapsed` stay readable after it closed.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 30.0,
                 log: Callable[[str], None] | None = None, final: bool = True, initial: int = 0,
                 widget: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every_s, self.final = int(total), desc, unit, float(every_s), final
        self.log, self.clock, self.done, self.initial = log or _print, clock, int(initial), int(initial)
        self.started = self._last_line = clock()
        self.closed = False
        self.bar = None
        if live_frontend() if widget is None else widget:
            from tqdm.notebook import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, initial=self.initial)

    def elapsed(self) -> float:
        """Seconds since the bar started."""
        return self.clock() - self.started

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self._last_line >= self.every_s and self.done < self.total:
            self._last_line = now
            self.log(self.line())

    def line(self) -> str:
        """Where the work stands, in one line."""
        elapsed, new = self.elapsed(), self.done - self.initial
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %), {elapsed:.0f} s elapsed"
        if 0 < new and self.done < self.total:
            text += f", ETA {elapsed / new * (self.total - self.done):.0f} s"
        return text

    def close(self, failed: bool | None = None) -> None:
        """End the bar and write the final line (unless ``final`` is off).

        ``failed``: None infers it from the count (short of ``total``: stopped); False says a short end was meant
        (early stopping), so a widget ends green at its count instead of red.
        """
        if self.closed:
            return
        self.closed = True
        failed = self.done < self.total if failed is None else failed
        if self.bar is not None:
            if not failed:
                self.bar.total = self.bar.n
            self.bar.close()  # tqdm paints a bar left short red
        if self.final:
            self.log(f"{self.desc}: {'stopped at ' if failed else ''}{self.done}/{self.total} {self.unit} "
                     f"{'after' if failed else 'in'} {self.elapsed():.0f} s")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=True if exc_type is not None else None)


def progress(total: int, desc: str, unit: str = "it", every_s: float = 30.0,
             log: Callable[[str], None] | None = None, final: bool = True, initial: int = 0) -> Progress:
    """A :class:`Progress`; use it as a context manager and call ``update()`` per unit of work."""
    return Progress(total, desc, unit, every_s, log, final, initial)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", every_s: float = 30.0,
          log: Callable[[str], None] | None = None, final: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` counting each one (``total``: ``len(items)`` unless given)."""
    with progress(len(items) if total is None else total, desc, unit, every_s, log, final) as bar:  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.update()


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to ``level`` inside the block (their INFO chatter dropped), then restore them."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)
