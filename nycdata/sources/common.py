"""Small helpers every fetcher shares: the log callback type, text of a metadata value, bbox and folder-name checks."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

Log = Callable[[str], None]


def as_text(value: Any) -> str:
    """A metadata value as manifest text: None and NaN -> ``""``, anything else ``str(value)``."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """``bbox`` as four floats (lon_min, lat_min, lon_max, lat_max); a ValueError unless it is one in degrees."""
    if len(bbox) != 4:
        raise ValueError(f"bbox must be (lon_min, lat_min, lon_max, lat_max), got {bbox!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise ValueError(f"bbox must be (lon_min, lat_min, lon_max, lat_max) in degrees with min <= max, got {bbox!r}")
    return x0, y0, x1, y1


def safe_name(name: str, what: str) -> str:
    """``name`` when it can be one folder of a manifest path (no separator, not ``.``/``..``), else a ValueError."""
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"{what} {name!r} cannot be used as a folder name")
    return name
