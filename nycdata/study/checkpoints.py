"""A cell's checkpoints: written so a kill cannot leave half a file, a corrupt one set aside instead of stopping the
grid, and a finished cell keeping only what evaluation and sharing need.

- **Atomic.** Lightning's ``TorchCheckpointIO`` writes ``last.ckpt`` in place, so a job killed mid-write (or a full
  disk) leaves a truncated file where the last good one was, and resuming then dies deep inside papermill with
  ``PytorchStreamReader failed reading zip archive``. :class:`AtomicCheckpointIO` writes a sibling and renames it.
- **Corrupt or missing.** A resumed cell whose ``last.ckpt`` cannot be read (or that stopped before its first
  checkpoint) is moved to ``<run>/set_aside/...`` and restarts from scratch with a warning naming the file.
- **Small.** ``best.ckpt`` holds weights and hyperparameters only (what evaluation and publishing load); the full
  ``last.ckpt`` (optimizer state: about twice the weights) exists only while the cell can still resume.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nycdata.runs import CellLayout, RunLayout


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, via a temporary sibling and an atomic rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint (first line of the error), or None when it can.

    Memory-mapped, so checking a 1 GB checkpoint reads its index, not its tensors."""
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to load means the file cannot resume the cell
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def resumable(run: RunLayout, cell: CellLayout, log=print) -> bool:
    """Can ``cell`` resume from its ``last.ckpt``? If it holds an unreadable one, or a started run without one, its
    files are set aside (see :func:`set_aside`) with a warning and it starts from scratch (False)."""
    if not cell.root.is_dir() or not any(cell.root.iterdir()):
        return False
    last = cell.last_checkpoint
    reason = unreadable(last) if last.is_file() else "the run stopped before its first checkpoint"
    if reason is None:
        return True
    moved = set_aside(run, cell)
    message = (f"{last} cannot resume this cell ({reason}); its files were moved to {moved} and the cell restarts "
               "from scratch")
    warnings.warn(message, stacklevel=2)
    log(f"WARNING: {message}")
    return False


def set_aside(run: RunLayout, cell: CellLayout) -> Path:
    """Move everything in ``cell`` to ``<run>/set_aside/<cell path>/<UTC time>/`` (kept for inspection, out of
    every later step's way); the cell folder stays, empty."""
    target = run.set_aside / cell.root.relative_to(run.root) / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=False)
    for entry in cell.root.iterdir():
        shutil.move(str(entry), target / entry.name)
    return target


def finish(cell: CellLayout) -> None:
    """A finished cell cannot resume any more: drop ``last.ckpt`` (weights plus optimizer state), keep ``best.ckpt``."""
    cell.last_checkpoint.unlink(missing_ok=True)
