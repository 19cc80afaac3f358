"""The sources manifest, ``sources.csv``: the hand-off between fetching and building, with its one reader and writer.

The fetchers (:mod:`nycdata.sources.stac`, :mod:`nycdata.sources.majortom`,
:mod:`nycdata.sources.worldcover`) write it with :func:`write_manifest`; the
builder (:mod:`nycdata.sources.build`) reads it with :func:`manifest_frame`;
both go through one CSV parser. It can also be written by hand.

``sources.csv`` (one row per file; every value is text, empty = unknown/none):

=====================  ==========================================================
``parent_id``          Major-TOM grid cell (``452U_625L``), STAC parent cell (``E0584N4505``),
                       or ``*`` = applies to every parent (WorldCover; the
                       builder clips it to each parent's footprint)
``modality``           ``S2L2A``, ``S1RTC``, ``DEM`` or ``WORLDCOVER``
``date``               acquisition date ``YYYY-MM-DD``; empty for DEM and WORLDCOVER
``band``               ``B01`` ... ``B12`` (with ``B8A``), ``VV``/``VH``, ``DEM``;
                       empty when the file holds every band of the modality in
                       canonical order
``path``               file path relative to the manifest's folder (``/``-separated)
``cloud_cover``        scene / cell cloud percentage, or empty
``processing_baseline`` Sentinel-2 baseline such as ``04.00``, or empty; ``99.99``
                       (Major-TOM ``N9999``) = reprocessed, offset judged from pixels
``product_id``         source product / item id, free text
=====================  ==========================================================

The files are written as the source ships them: Major-TOM S1RTC is linear
power (the builder converts to dB), S2 digital numbers are not harmonised
(the builder uses ``processing_baseline``, see :func:`needs_offset`), STAC bands
keep their native 10/20/60 m grids (the builder resamples).
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from nycdata.data.chips import S1RTC_BANDS, S2L2A_BANDS
from nycdata.sources.common import as_text

MANIFEST_FILE = "sources.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "parent_id", "modality", "date", "band", "path", "cloud_cover", "processing_baseline", "product_id")
REQUIRED_COLUMNS: tuple[str, ...] = ("parent_id", "modality", "date", "band", "path")  # a hand-written one may omit the rest
MANIFEST_KEY: tuple[str, ...] = ("parent_id", "modality", "date", "band")  # one file per key
ALL_PARENTS = "*"
MODALITY_BANDS: dict[str, tuple[str, ...]] = {"S2L2A": S2L2A_BANDS, "S1RTC": S1RTC_BANDS, "DEM": ("DEM",), "WORLDCOVER": ()}
SOURCE_MODALITIES: tuple[str, ...] = tuple(MODALITY_BANDS)
DATED_MODALITIES: tuple[str, ...] = ("S2L2A", "S1RTC")

# --------------------------------------------------------------------------- the S2 offset rule

# S2 L2A processing baseline 04.00 (from 2022-01-25) added a +1000 BOA offset (BOA_ADD_OFFSET); the builder brings
# every scene to s2_offset_convention.
S2_OFFSET = 1000
OFFSET_BASELINE = "04.00"
OFFSET_DATE = dt.date(2022, 1, 25)
REPROCESSED_BASELINE = "99.99"  # Major-TOM N9999: CloudFerro reprocessings with various Sen2Cor versions


def baseline_has_offset(baseline: str) -> bool:
    """Whether a known processing baseline (``"03.00"``, ``"04.00"``, ...) delivers DNs with the +1000 offset."""
    return baseline >= OFFSET_BASELINE


def needs_offset(date: str, baseline: str) -> bool:
    """True for scenes delivered without the +1000 BOA offset: baseline < 04.00, or (baseline unknown) before 2022-01-25.
    Baseline 99.99 cannot be judged from metadata: see :func:`nycdata.sources.build.offset_from_pixels`."""
    if baseline == REPROCESSED_BASELINE:
        raise ValueError("processing baseline 99.99 says nothing about the offset; judge it with offset_from_pixels")
    if baseline:
        return not baseline_has_offset(baseline)
    return dt.date.fromisoformat(date) < OFFSET_DATE


_BASELINE_RE = re.compile(r"_N(\d{2})(\d{2})(?=_|\.|$)")


def parse_processing_baseline(product_id: str | None) -> str:
    """``S2A_MSIL2A_20210615T154911_N0300_R054_T18TWL_20210615T200409`` -> ``"03.00"``; no ``_Nxxxx`` token -> ``""``."""
    match = _BASELINE_RE.search(product_id or "")
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def normalise_baseline(value: Any) -> str:
    """A STAC ``s2:processing_baseline`` (``"04.00"``, ``"4.0"``, ``4``, ``"N0400"``) as ``"04.00"``; unknown -> ``""``."""
    text = as_text(value).strip()
    if not text:
        return ""
    if re.fullmatch(r"N?\d{4}", text):
        digits = text.lstrip("N")
        return f"{digits[:2]}.{digits[2:]}"
    try:
        return f"{float(text):05.2f}"
    except ValueError:
        return ""


# --------------------------------------------------------------------------- rows

class SourceError(ValueError):
    """A source file or manifest row cannot be used; the message names it and says what to do."""


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _cloud_text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    number = float(value)
    return "" if math.isnan(number) else repr(number)


def normalise_row(row: Mapping[str, Any]) -> dict[str, str]:
    """One manifest row as text in :data:`MANIFEST_COLUMNS`, checked (modality, band, date, relative path)."""
    unknown = set(row) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"manifest row has unknown columns {sorted(unknown)}; columns are {list(MANIFEST_COLUMNS)}")
    out = {col: as_text(row.get(col)) for col in MANIFEST_COLUMNS}
    out["cloud_cover"] = _cloud_text(row.get("cloud_cover"))
    where = f"manifest row {out}"
    if not out["parent_id"]:
        raise ValueError(f"{where}: parent_id is empty")
    if out["modality"] not in MODALITY_BANDS:
        raise ValueError(f"{where}: modality {out['modality']!r} not one of {list(SOURCE_MODALITIES)}")
    if out["band"] and out["band"] not in MODALITY_BANDS[out["modality"]]:
        raise ValueError(f"{where}: band {out['band']!r} not a {out['modality']} band "
                         f"{list(MODALITY_BANDS[out['modality']])} (or empty = all bands)")
    if out["modality"] in DATED_MODALITIES:
        if not _DATE_RE.match(out["date"]):
            raise ValueError(f"{where}: {out['modality']} needs an ISO date YYYY-MM-DD, got {out['date']!r}")
    elif out["date"]:
        raise ValueError(f"{where}: {out['modality']} rows have an empty date")
    path = out["path"].replace("\\", "/")
    if not path or path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in path.split("/"):
        raise ValueError(f"{where}: path must be relative to the manifest folder, got {out['path']!r}")
    out["path"] = path
    return out


def sort_key(row: Mapping[str, str]) -> tuple:
    """The manifest's row order: parent, modality (canonical order), date, band (canonical order)."""
    bands = MODALITY_BANDS.get(row["modality"], ())
    band_rank = bands.index(row["band"]) if row["band"] in bands else -1
    modality_rank = (SOURCE_MODALITIES.index(row["modality"]) if row["modality"] in SOURCE_MODALITIES
                     else len(SOURCE_MODALITIES))
    return (row["parent_id"], modality_rank, row["date"], band_rank, row["band"])


# --------------------------------------------------------------------------- reading and writing

def _parse(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The one CSV parser of sources.csv: its header and its rows as dicts of text (a short row's missing values
    are ``""``). Nothing is converted: "04.00" stays "04.00"."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or ())
        return columns, [{col: row.get(col) or "" for col in columns} for row in reader]


def read_manifest(out_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``out_dir/sources.csv`` as dicts of strings (``[]`` when there is none). Values stay text: "04.00" stays "04.00".

    The fetchers' view: the file must have exactly :data:`MANIFEST_COLUMNS`, in that order."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        return []
    columns, rows = _parse(path)
    if tuple(columns) != MANIFEST_COLUMNS:
        raise ValueError(f"{path}: columns {columns} are not {list(MANIFEST_COLUMNS)}")
    return rows


def manifest_frame(path: str | Path) -> pd.DataFrame:
    """The builder's view of the manifest file ``path``: one text row per file, plus ``file``, its absolute path.

    :data:`REQUIRED_COLUMNS` must be there (a hand-written manifest may leave out the others, which are then empty),
    every modality known and every listed file present; otherwise a :class:`SourceError` saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"sources manifest {path} not found; write it with `python -m nycdata fetch ...`")
    columns, rows = _parse(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise SourceError(f"{path}: columns {missing} missing; expected {list(MANIFEST_COLUMNS)}")
    frame = pd.DataFrame(rows, columns=columns, dtype=str)
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    bad = frame.loc[~frame["modality"].isin(SOURCE_MODALITIES)]
    if len(bad):
        raise SourceError(f"{path} row {bad.index[0] + 2}: modality {bad.iloc[0]['modality']!r}; expected one of {SOURCE_MODALITIES}")
    frame["file"] = [str((path.parent / p).resolve()) for p in frame["path"]]
    absent = [f for f in frame["file"] if not Path(f).is_file()]
    if absent:
        raise SourceError(f"{path}: {len(absent)} listed files do not exist, e.g. {absent[0]}")
    return frame


def write_manifest(rows: Iterable[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Write ``out_dir/sources.csv``, merged with any manifest already there.

    A row with the same (parent_id, modality, date, band) as an existing one
    replaces it (a later row in ``rows`` wins over an earlier one), so a
    resumed fetch never duplicates. Rows are validated and sorted (parent,
    modality, date, canonical band order); the file is replaced atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: dict[tuple[str, ...], dict[str, str]] = {}
    for row in [*read_manifest(out_dir), *rows]:
        clean = normalise_row(row)
        merged[tuple(clean[k] for k in MANIFEST_KEY)] = clean
    target = out_dir / MANIFEST_FILE
    tmp = target.with_name(f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(merged.values(), key=sort_key))
    os.replace(tmp, target)
    return target
