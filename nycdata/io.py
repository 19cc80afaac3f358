"""Small file-system helpers shared by every writer: nothing half-written is left behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def replace_dir_atomically(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``target`` on success.

    On any exception the temporary directory is removed and ``target`` is left
    exactly as it was. An existing non-empty ``target`` is an error unless
    ``overwrite`` is true.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if _is_nonempty_dir(target) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; choose another directory or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_json(path: Path, payload) -> Path:
    """Write strict JSON via a temporary file and rename, so readers never see half a file.

    NaN and +-inf (Python or numpy floats, numpy arrays, at any depth) become
    ``null``: ``NaN`` is not JSON, and strict parsers (JavaScript, jq, most
    non-Python libraries) reject the whole file. ``allow_nan=False`` then makes
    anything that slipped through an error here rather than a broken file.
    """
    text = json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8, whatever the locale: reports hold "Δ" and "±") via a temporary sibling file and
    rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def strict_json(value):
    """``value`` with non-finite floats replaced by None, numpy/torch arrays and scalars as Python lists and numbers."""
    if isinstance(value, dict):
        return {_plain(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors: to Python, then cleaned
        return strict_json(value.tolist())
    return value


def _plain(key):
    """numpy scalar dict keys (e.g. from a groupby) as Python ones, which json accepts."""
    return key.item() if hasattr(key, "item") else key


def _json_default(value):
    if hasattr(value, "item"):  # other scalars with .item() but no .tolist()
        return strict_json(value.item())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
