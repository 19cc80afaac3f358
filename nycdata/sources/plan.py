"""What a fetch will get (``--dry-run``), how far a download is, and what a fetch got: shared by every source.

A fetcher first lists the files it would write as :class:`PlannedFile` rows;
``--dry-run`` prints :func:`plan_table` and writes nothing. A real fetch
reports bytes with :class:`ByteProgress` and ends with :func:`fetched_table`
over the manifest it wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from nycdata.sources.common import Log


@dataclass(frozen=True)
class PlannedFile:
    """One file (or one stacked raster) a fetch would write."""

    source: str  # where it comes from: "planetary-computer", "Major-TOM/Core-S2L2A", "esa-worldcover", ...
    parent_id: str  # parent cell / grid cell, or "*" for every parent
    modality: str  # S2L2A, S1RTC, DEM, WORLDCOVER
    date: str  # ISO acquisition date, "" for static layers
    product_id: str  # the source's item / product id
    cloud_cover: float | None  # scene cloud cover in %, None if not applicable or unknown
    est_bytes: int | None  # estimated size on disk (uncompressed raster size when the source does not say)
    note: str = ""  # why this file, or what is special about it ("S1 2 d after S2", "single date per cell")


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"?"``."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def raster_bytes(width: int, height: int, bands: int, dtype_bytes: int) -> int:
    """Uncompressed size of a raster: the estimate a plan gives when a source does not publish file sizes."""
    return int(width) * int(height) * int(bands) * int(dtype_bytes)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def plan_table(files: Iterable[PlannedFile]) -> str:
    """The dry-run plan: one line per planned file, then totals per modality and overall."""
    files = list(files)
    if not files:
        return "nothing to fetch: no product matched the filters (see the log lines above for what was dropped and why)"
    rows = [(f.source, f.parent_id, f.modality, f.date or "-", f.product_id,
             "-" if f.cloud_cover is None else f"{f.cloud_cover:.1f}", human_bytes(f.est_bytes), f.note) for f in files]
    lines = _table(("source", "parent", "modality", "date", "product", "cloud %", "est. size", "note"), rows)
    by_modality: dict[str, list[PlannedFile]] = {}
    for f in files:
        by_modality.setdefault(f.modality, []).append(f)
    lines.append("")
    for modality, group in by_modality.items():
        known = [f.est_bytes for f in group if f.est_bytes is not None]
        lines.append(f"{modality}: {len(group)} files in {len({f.parent_id for f in group})} parents, "
                     f"about {human_bytes(sum(known))}" + ("" if len(known) == len(group) else " (some sizes unknown)"))
    total = sum(f.est_bytes or 0 for f in files)
    lines.append(f"total: {len(files)} files, about {human_bytes(total)}; nothing was written (dry run)")
    return "\n".join(lines)


def fetched_table(manifest_rows: Iterable[Mapping[str, str]], root: str | Path) -> str:
    """What a fetch got: per (parent, modality) the number of files, their dates and their size on disk."""
    root = Path(root)
    groups: dict[tuple[str, str], list[Mapping[str, str]]] = {}
    for row in manifest_rows:
        groups.setdefault((row["parent_id"], row["modality"]), []).append(row)
    rows, total = [], 0
    for (parent, modality), group in sorted(groups.items()):
        size = sum((root / r["path"]).stat().st_size for r in group if (root / r["path"]).is_file())
        total += size
        dates = sorted({r["date"] for r in group if r["date"]})
        rows.append((parent, modality, str(len(group)), ", ".join(dates) if dates else "-", human_bytes(size)))
    if not rows:
        return "fetched nothing"
    lines = _table(("parent", "modality", "files", "dates", "on disk"), rows)
    lines.append(f"total: {sum(int(r[2]) for r in rows)} files, {human_bytes(total)} under {root}")
    return "\n".join(lines)


class ByteProgress:
    """Logs a download's progress at most every ``every_s`` seconds, plus once when it completes.

    Call it with the number of new bytes; ``total`` may be None (unknown length).
    """

    def __init__(self, what: str, total: int | None, log: Log | None, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, start: int = 0):
        self.what, self.total, self.log, self.every_s, self.clock = what, total, log, every_s, clock
        self.done = start
        self._started = self._last = clock()

    def __call__(self, n_bytes: int) -> None:
        self.done += n_bytes
        now = self.clock()
        if self.log and now - self._last >= self.every_s:
            self._last = now
            self.log(self.line())

    def line(self) -> str:
        elapsed = max(self.clock() - self._started, 1e-9)
        of = f" of {human_bytes(self.total)} ({self.done / self.total:.0%})" if self.total else ""
        return f"  {self.what}: {human_bytes(self.done)}{of}, {human_bytes(self.done / elapsed)}/s"

    def finish(self) -> None:
        if self.log:
            self.log(self.line() + " done")
