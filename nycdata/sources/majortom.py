"""Major-TOM Core on Hugging Face (``Major-TOM/Core-S2L2A``, ``Core-S1RTC``, ``Core-DEM``) -> raw files, sources.csv.

Core is single-date: it holds each ~10 km grid cell once, with one S2 product
(2018-2021 acquisitions, plus reprocessed ``N9999`` ones) and one S1 product
whose date is unrelated to the S2 one. It is not a time series: one date per
parent, so build it with ``temporal_mode: replicate`` (``params/original.yaml``).
Cells are chosen once from the S2 metadata; S1 and DEM follow by grid cell.

:func:`fetch_majortom` is resumable (files on disk are skipped, the manifest is
merged after each shard); ``dry_run=True`` logs the plan (cells, dates,
products, cloud, estimated sizes: :func:`nycdata.sources.plan.plan_table`) and
writes nothing. Command::

    python -m nycdata fetch majortom data/original_sources -f params/original.yaml [--dry-run]
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote

import pandas as pd

from nycdata.data.chips import NYC_BBOX, S2L2A_BANDS
from nycdata.sources.common import Log, as_text, check_bbox, safe_name
from nycdata.sources.http import OFFLINE_HINT, OfflineError, with_retries
from nycdata.sources.manifest import (MANIFEST_FILE, REPROCESSED_BASELINE, parse_processing_baseline, read_manifest,
                                      write_manifest)
from nycdata.sources.plan import PlannedFile, fetched_table, human_bytes, plan_table, raster_bytes

MAJORTOM_ORG = "Major-TOM"
MAJORTOM_S2 = "Core-S2L2A"
MAJORTOM_DEFAULT_COLLECTIONS = ("Core-S2L2A", "Core-S1RTC", "Core-DEM")
# collection -> (modality, {manifest band: column of the image shard}). Shard columns as the dataset cards declare
# them (README `dataset_info` of huggingface.co/datasets/Major-TOM/Core-S2L2A and Core-S1RTC; Core-DEM's viewer):
# S2 product_id, grid_cell, product_datetime, thumbnail, B01..B12 with B8A, cloud_mask; S1 ..., vv, vh; DEM
# grid_cell, thumbnail, compressed, DEM.
MAJORTOM_COLLECTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "Core-S2L2A": ("S2L2A", {band: band for band in S2L2A_BANDS}),
    "Core-S1RTC": ("S1RTC", {"VV": "vv", "VH": "vh"}),
    "Core-DEM": ("DEM", {"DEM": "DEM"}),
}
# The metadata.parquet columns each collection must have. Cells are chosen once, on S2's centre_lon/centre_lat;
# S1RTC and DEM rows are matched to them by grid_cell, so their centre columns are not needed.
MAJORTOM_NEEDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "Core-S2L2A": ("grid_cell", "product_id", "timestamp", "cloud_cover", "centre_lat", "centre_lon",
                   "parquet_url", "parquet_row"),
    "Core-S1RTC": ("grid_cell", "product_id", "timestamp", "parquet_url", "parquet_row"),
    "Core-DEM": ("grid_cell", "parquet_url", "parquet_row"),
}
# Band files of one product, for the dry run's size estimate (uncompressed): Core keeps S2 bands at their native
# 10/20/60 m over the 10.68 km cell (1068/534/178 px, uint16; the S2L2A card lists each band's resolution);
# S1RTC 1068 px of linear power (float32 assumed: the card gives no dtype); DEM 356 px at 30 m, 32 bits per
# sample (the GeoTIFF header of a DEM value in the Core-DEM viewer).
_S2_SIDE_PX = {**{b: 534 for b in S2L2A_BANDS}, **{b: 1068 for b in ("B02", "B03", "B04", "B08")},
               **{b: 178 for b in ("B01", "B09")}}
MAJORTOM_FILE_BYTES: dict[tuple[str, str], int] = {
    **{("S2L2A", b): raster_bytes(side, side, 1, 2) for b, side in _S2_SIDE_PX.items()},
    ("S1RTC", "VV"): raster_bytes(1068, 1068, 1, 4), ("S1RTC", "VH"): raster_bytes(1068, 1068, 1, 4),
    ("DEM", "DEM"): raster_bytes(356, 356, 1, 4),
}
SINGLE_DATE_NOTE = ("Major-TOM Core is single-date: it holds each grid cell once, one S2 product per cell (2018-2021 "
                    "acquisitions and reprocessed ones) and one S1 product whose date is unrelated to the S2 one. "
                    "Build it with temporal_mode: replicate (as params/original.yaml does); T distinct dates need a "
                    "multi-date source.")


def _iso_date(value: Any) -> str:
    return pd.Timestamp(value).date().isoformat()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_majortom_metadata(path: str | Path, collection: str) -> pd.DataFrame:
    """The columns of a Major-TOM ``metadata.parquet`` that :data:`MAJORTOM_NEEDED_COLUMNS` lists; a missing one
    (Major-TOM renamed it?) is a ValueError naming the column and the file."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in MAJORTOM_NEEDED_COLUMNS[collection] if c not in names]
    if missing:
        raise ValueError(f"{MAJORTOM_ORG}/{collection} metadata.parquet ({path}) lacks column(s) {missing}; it has "
                         f"{names}. If Major-TOM renamed them, update MAJORTOM_NEEDED_COLUMNS in nycdata/sources/majortom.py")
    return pd.read_parquet(path, columns=list(MAJORTOM_NEEDED_COLUMNS[collection]))


def _majortom_dates(timestamps: pd.Series) -> pd.Series:
    """ISO dates of Major-TOM ``timestamp`` values (``20230415T181919``, or datetimes)."""
    return pd.to_datetime(timestamps.astype(str), utc=True, format="mixed").dt.strftime("%Y-%m-%d")


def _window_text(start: str | None, end: str | None) -> str:
    return f"{_iso_date(start) if start else ''}..{_iso_date(end) if end else ''}"


def _s2_drop_reason(date: str, cloud: float, start: str | None, end: str | None, max_cloud: float | None) -> str:
    """Why a filter drops one S2 product ("" = it passes)."""
    if (start and date < _iso_date(start)) or (end and date > _iso_date(end)):
        return f"S2 product dated {date} outside {_window_text(start, end)}"
    if max_cloud is not None and math.isnan(cloud):
        return f"S2 product {date} cloud cover unknown"
    if max_cloud is not None and cloud > max_cloud:
        return f"S2 product {date} has {cloud:.1f} % cloud > {float(max_cloud):.1f}"
    return ""


def select_majortom_cells(s2_metadata: pd.DataFrame, bbox: Sequence[float] = NYC_BBOX, start: str | None = None,
                          end: str | None = None, max_cloud: float | None = None,
                          log: Log | None = None) -> pd.DataFrame:
    """The grid cells to fetch, chosen once from Core-S2L2A's metadata: one S2 product per cell, sorted by cell.

    Keeps products whose centre (``centre_lon``, ``centre_lat``) lies in ``bbox`` (edges included), dated from
    ``start`` to ``end`` (None = open), with ``cloud_cover <= max_cloud`` (unknown cloud fails a cloud filter).
    Where a cell has several products (tile overlaps) the least cloudy passing one is kept. Adds ``date`` (ISO)
    and ``processing_baseline``. Every cell in the bbox that a filter drops is logged with the reason; cells
    outside the bbox only as a count.
    """
    log = log or (lambda _message: None)
    x0, y0, x1, y1 = check_bbox(bbox)
    inside = s2_metadata["centre_lon"].between(x0, x1) & s2_metadata["centre_lat"].between(y0, y1)
    df = s2_metadata.loc[inside].reset_index(drop=True)
    log(f"{MAJORTOM_ORG}/{MAJORTOM_S2}: {len(df)} of {len(s2_metadata)} S2 products ({df['grid_cell'].nunique()} "
        f"cells) have their centre in bbox {tuple(bbox)}; {len(s2_metadata) - len(df)} outside it "
        "(not listed per cell)")
    df["date"] = _majortom_dates(df["timestamp"])
    df["cloud_cover"] = pd.to_numeric(df["cloud_cover"], errors="coerce").astype(float)
    df["drop"] = [_s2_drop_reason(d, c, start, end, max_cloud) for d, c in zip(df["date"], df["cloud_cover"])]
    df = df.sort_values(["grid_cell", "cloud_cover", "date", "product_id"], kind="stable", na_position="last")
    chosen = []
    for cell, group in df.groupby("grid_cell", sort=True):
        passing = group[group["drop"] == ""]
        if passing.empty:
            for reason in group["drop"]:
                log(f"cell {cell}: {reason}")
            continue
        chosen.append(passing.iloc[0])
        if len(group) > 1:
            _log_choice(cell, passing.iloc[0], group.drop(index=passing.index[0]), log)
    out = pd.DataFrame(chosen, columns=df.columns).drop(columns="drop").reset_index(drop=True)
    out["processing_baseline"] = [parse_processing_baseline(p) for p in out["product_id"]]
    return out


def _log_choice(cell: str, kept: pd.Series, others: pd.DataFrame, log: Log) -> None:
    cloud = "cloud unknown" if math.isnan(kept["cloud_cover"]) else f"{kept['cloud_cover']:.1f} % cloud"
    why = [f"{r.product_id} ({r.drop or 'cloudier'})" for r in others.itertuples()]
    log(f"cell {cell}: {len(others) + 1} S2 products (tile overlaps); kept {kept['product_id']} ({kept['date']}, "
        f"{cloud}), not {', '.join(why)}")


def match_majortom_cells(metadata: pd.DataFrame, cells: pd.DataFrame, collection: str,
                         log: Log | None = None) -> pd.DataFrame:
    """One row of ``metadata`` (Core-S1RTC or Core-DEM) per chosen cell, matched by ``grid_cell``.

    ``cells`` is :func:`select_majortom_cells`' frame. With several products in a cell, the one nearest the cell's
    S2 date is kept. Adds ``date`` (ISO, ``""`` without ``timestamp``) and ``gap_days`` (this date minus the S2
    date). A cell without a product is logged and left out here; the cell itself stays (the builder decides).
    """
    log = log or (lambda _message: None)
    repo = f"{MAJORTOM_ORG}/{collection}"
    s2_dates = cells.set_index("grid_cell")["date"]
    df = metadata.loc[metadata["grid_cell"].isin(s2_dates.index)].copy()
    dated = "timestamp" in df.columns  # DEM is static: no timestamp
    df["date"] = _majortom_dates(df["timestamp"]) if dated else ""
    df["gap_days"] = (pd.to_datetime(df["date"]) - pd.to_datetime(df["grid_cell"].map(s2_dates))).dt.days if dated else 0
    df = df.assign(_abs=df["gap_days"].abs()).sort_values(["grid_cell", "_abs"], kind="stable").drop(columns="_abs")
    for cell in s2_dates.index.difference(df["grid_cell"]):
        log(f"cell {cell}: no product in {repo}")
    for cell, group in df.groupby("grid_cell"):
        if len(group) > 1:
            log(f"cell {cell}: {len(group)} products in {repo} (tile overlaps); kept the one nearest the S2 date")
    return df.drop_duplicates("grid_cell").reset_index(drop=True)


def _log_s2_notes(cells: pd.DataFrame, log: Log) -> None:
    for row in cells.loc[cells["processing_baseline"] == REPROCESSED_BASELINE].itertuples():
        log(f"cell {row.grid_cell}: S2 product {row.product_id}: processing baseline 99.99 (reprocessed): whether "
            "the +1000 offset is present is decided from the pixels when building")


def _gap_text(days: int) -> str:
    return "same day as" if days == 0 else f"{abs(days)} d {'after' if days > 0 else 'before'}"


def _log_s1_gaps(cells: pd.DataFrame, s1: pd.DataFrame, log: Log) -> None:
    s2_dates = cells.set_index("grid_cell")["date"]
    for row in s1.itertuples():
        log(f"cell {row.grid_cell}: S1 product {row.date} is {_gap_text(row.gap_days)} the S2 product "
            f"{s2_dates[row.grid_cell]} (unrelated acquisitions: Core pairs S1 and S2 by cell only)")


def _select_majortom(bbox, start, end, max_cloud, collections, fetch_metadata, log) -> dict[str, pd.DataFrame]:
    """{collection: one row per cell}: S2 chooses the cells (even when its images are not wanted), the others follow."""
    cells = select_majortom_cells(fetch_metadata(MAJORTOM_S2), bbox, start, end, max_cloud, log)
    log(f"Major-TOM: {len(cells)} cells chosen, one S2 date each")
    _log_s2_notes(cells, log)
    selection = {MAJORTOM_S2: cells} if MAJORTOM_S2 in collections else {}
    for collection in (c for c in collections if c != MAJORTOM_S2):
        selection[collection] = match_majortom_cells(fetch_metadata(collection), cells, collection, log)
        if collection == "Core-S1RTC":
            _log_s1_gaps(cells, selection[collection], log)
    return selection


def _majortom_targets(modality: str, cell: str, date: str, bands: Iterable[str]) -> dict[str, str]:
    """{band: path relative to out_dir} for one selected product."""
    if modality == "DEM":
        return {band: f"{cell}/DEM/DEM.tif" for band in bands}
    return {band: f"{cell}/{modality}/{date}_{band}.tif" for band in bands}


def _plan_note(modality: str, row) -> str:
    if modality == "S2L2A":
        baseline = getattr(row, "processing_baseline", "")
        reprocessed = baseline == REPROCESSED_BASELINE
        return "single date per cell" + ("; baseline 99.99: offset judged from pixels" if reprocessed else "")
    if modality == "S1RTC":
        return f"S1 {_gap_text(int(row.gap_days))} S2 (unrelated)"
    return "static"


def majortom_plan(selection: Mapping[str, pd.DataFrame]) -> list[PlannedFile]:
    """One :class:`PlannedFile` per band file that :func:`fetch_majortom` would write for ``selection``."""
    plan = []
    for collection, rows in selection.items():
        modality, band_columns = MAJORTOM_COLLECTIONS[collection]
        for row in rows.itertuples():
            cloud = row.cloud_cover if modality == "S2L2A" and not math.isnan(row.cloud_cover) else None
            plan += [PlannedFile(source=f"{MAJORTOM_ORG}/{collection}", parent_id=row.grid_cell, modality=modality,
                                 date=row.date if modality != "DEM" else "",
                                 product_id=as_text(getattr(row, "product_id", "")),
                                 cloud_cover=cloud, est_bytes=MAJORTOM_FILE_BYTES[(modality, band)],
                                 note=_plan_note(modality, row)) for band in band_columns]
    return plan


_HF_URL_RE = re.compile(r"^https?://huggingface\.co/datasets/([^/]+/[^/]+)/resolve/([^/]+)/([^?#]+)")


def parse_hf_url(url: str) -> tuple[str, str, str]:
    """``https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_00001.parquet``
    -> ``("Major-TOM/Core-S2L2A", "main", "images/part_00001.parquet")``. Only the repo, revision and file are
    used: the request goes to ``hf_endpoint`` (a mirror, or a test server), not to the host in the URL."""
    match = _HF_URL_RE.match(url)
    if not match:
        raise ValueError(f"not a Hugging Face dataset file URL: {url!r}")
    return match.group(1), unquote(match.group(2)), unquote(match.group(3))


def _hf_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _default_hf_download(**kwargs) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(**kwargs)


def _shard_opener(mode: str, hf_download: Callable[..., str], endpoint: str | None,
                  cache_dir: str | Path | None) -> Callable[[str], Any]:
    """``range``: open the shard through ``HfFileSystem`` (HTTP range reads of the footer and the wanted row
    group only). ``download``: fetch the whole shard into the Hugging Face cache with ``hf_hub_download``."""
    if mode == "range":
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem(endpoint=endpoint)

        def open_range(url: str):
            repo_id, revision, filename = parse_hf_url(url)
            return fs.open(f"datasets/{repo_id}@{revision}/{filename}", "rb", block_size=1 << 22)

        return open_range
    if mode == "download":
        def open_download(url: str):
            repo_id, revision, filename = parse_hf_url(url)
            return hf_download(repo_id=repo_id, repo_type="dataset", filename=filename, revision=revision,
                               endpoint=endpoint, cache_dir=cache_dir)

        return open_download
    raise ValueError(f"shard_access must be 'range' or 'download', got {mode!r}")


class _Shard:
    """One image shard, opened on first read and closed after a failed one (so that a retry starts clean)."""

    def __init__(self, url: str, opener: Callable[[str], Any]):
        self.url, self._opener, self._handle, self._file = url, opener, None, None

    def read(self, index: int, columns: list[str]):
        import pyarrow.parquet as pq

        try:
            if self._file is None:
                self._handle = self._opener(self.url)
                self._file = pq.ParquetFile(self._handle)
            names = self._file.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"image shard {self.url} has no column(s) {missing}; it has {names}")
            if not 0 <= index < self._file.num_row_groups:
                raise ValueError(f"image shard {self.url}: metadata says row group {index}, the shard has "
                                 f"{self._file.num_row_groups}")
            checks = [c for c in ("grid_cell", "product_id") if c in names and c not in columns]
            return self._file.read_row_group(index, columns=columns + checks)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        handle, self._handle, self._file = self._handle, None, None
        close = getattr(handle, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a broken remote file must not hide the real error
                pass


def _check_row_group(table, url: str, index: int, cell: str, product_id: str) -> None:
    """The row group must hold the product the metadata points at: a stale metadata.parquet would mix cells."""
    for column, expected in (("grid_cell", cell), ("product_id", product_id)):
        if expected and column in table.column_names and str(table[column][0].as_py()) != expected:
            raise ValueError(f"{url} row group {index} holds {column} {table[column][0].as_py()!r}, "
                             f"metadata says {expected!r}")


def _fetch_product(row, modality: str, band_columns: Mapping[str, str], shard: _Shard, out_dir: Path,
                   retry: Mapping[str, Any], where: str, log: Log) -> list[dict]:
    """Write one product's band files (those not on disk yet) and return its manifest rows."""
    cell = safe_name(str(row.grid_cell), "grid_cell")
    date = row.date if modality != "DEM" else ""
    product_id = as_text(getattr(row, "product_id", ""))
    targets = _majortom_targets(modality, cell, date, band_columns)
    todo = {b: p for b, p in targets.items() if not (out_dir / p).exists()}
    if todo:
        index = int(row.parquet_row)
        table = with_retries(lambda: shard.read(index, [band_columns[b] for b in todo]),
                       f"{shard.url} row group {index}", **retry)
        _check_row_group(table, shard.url, index, cell, product_id)
        written = 0
        for band, rel in todo.items():
            value = table[band_columns[band]][0].as_py()
            if not value:
                raise ValueError(f"{shard.url} row group {index}: column {band_columns[band]!r} is empty")
            _write_bytes_atomic(out_dir / rel, value)
            written += len(value)
        log(f"{where}: wrote {len(todo)} of {len(targets)} files, {human_bytes(written)}")
    else:
        log(f"{where}: all {len(targets)} files already there, skipped")
    s2 = modality == "S2L2A"
    return [dict(parent_id=cell, modality=modality, date=date, band=band, path=rel,
                 cloud_cover=row.cloud_cover if s2 else None,
                 processing_baseline=row.processing_baseline if s2 else "", product_id=product_id)
            for band, rel in targets.items()]


def _fetch_collection(collection: str, rows: pd.DataFrame, opener: Callable[[str], Any], out_dir: Path,
                      retry: Mapping[str, Any], log: Log) -> None:
    """Every product of ``rows``, shard by shard; the manifest is written after each shard, so a stop resumes."""
    modality, band_columns = MAJORTOM_COLLECTIONS[collection]
    done = 0
    for url, group in rows.groupby("parquet_url", sort=False):
        shard, manifest_rows = _Shard(url, opener), []
        try:
            for row in group.itertuples(index=False):
                done += 1
                when = "" if modality == "DEM" else f" {row.date}"
                where = f"[{done}/{len(rows)}] {modality} cell {row.grid_cell}{when}"
                manifest_rows += _fetch_product(row, modality, band_columns, shard, out_dir, retry, where, log)
        finally:
            shard.close()
            if manifest_rows:
                write_manifest(manifest_rows, out_dir)


def _metadata_fetcher(hf_download: Callable[..., str], endpoint: str | None, cache_dir: str | Path | None,
                      retry: Mapping[str, Any], log: Log) -> Callable[[str], pd.DataFrame]:
    def fetch_metadata(collection: str) -> pd.DataFrame:
        repo_id = f"{MAJORTOM_ORG}/{collection}"
        path = with_retries(lambda: hf_download(repo_id=repo_id, repo_type="dataset", filename="metadata.parquet",
                                          endpoint=endpoint, cache_dir=cache_dir),
                      f"Hugging Face dataset {repo_id} (metadata.parquet)", **retry)
        log(f"{repo_id}: metadata.parquet, {human_bytes(Path(path).stat().st_size)} (Hugging Face cache: {path})")
        return read_majortom_metadata(path, collection)

    return fetch_metadata


def _check_majortom_call(collections: Sequence[str]) -> None:
    unknown = [c for c in collections if c not in MAJORTOM_COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown Major-TOM collections {unknown}; choose from {list(MAJORTOM_COLLECTIONS)}")
    if _hf_offline_requested():
        repos = ", ".join(f"{MAJORTOM_ORG}/{c}" for c in dict.fromkeys([MAJORTOM_S2, *collections]))
        raise OfflineError(f"HF_HUB_OFFLINE=1 is set, so {repos} cannot be fetched from Hugging Face: this machine "
                           f"appears to be offline (or is told to be). {OFFLINE_HINT} Unset HF_HUB_OFFLINE to fetch.")


def plan_majortom(bbox: Sequence[float] = NYC_BBOX, start: str | None = None, end: str | None = None,
                  max_cloud: float | None = 30.0, collections: Sequence[str] = MAJORTOM_DEFAULT_COLLECTIONS,
                  log: Log = print, *, hf_endpoint: str | None = None, hf_cache_dir: str | Path | None = None,
                  retries: int = 5, backoff: float = 1.0, sleep: Callable[[float], Any] = time.sleep,
                  hf_download: Callable[..., str] | None = None) -> list[PlannedFile]:
    """What :func:`fetch_majortom` would write, from the metadata only (``metadata.parquet`` files land in the
    Hugging Face cache; nothing else is written): one :class:`PlannedFile` per band file, sizes estimated from
    the Core product shapes (:data:`MAJORTOM_FILE_BYTES`)."""
    _check_majortom_call(collections)
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    fetch_metadata = _metadata_fetcher(hf_download or _default_hf_download, hf_endpoint, hf_cache_dir, retry, log)
    return majortom_plan(_select_majortom(bbox, start, end, max_cloud, collections, fetch_metadata, log))


def fetch_majortom(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, start: str | None = None,
                   end: str | None = None, max_cloud: float | None = 30.0,
                   collections: Sequence[str] = MAJORTOM_DEFAULT_COLLECTIONS, log: Log = print, *,
                   dry_run: bool = False, shard_access: str = "range", hf_endpoint: str | None = None,
                   hf_cache_dir: str | Path | None = None, retries: int = 5, backoff: float = 1.0,
                   sleep: Callable[[float], Any] = time.sleep, hf_download: Callable[..., str] | None = None,
                   open_shard: Callable[[str], Any] | None = None) -> Path | list[PlannedFile]:
    """Fetch Major-TOM Core S2L2A / S1RTC / DEM over ``bbox`` into ``out_dir``; return ``out_dir/sources.csv``
    (with ``dry_run``: the planned files, and nothing is written).

    Command (on a machine with internet; nothing is fetched with ``HF_HUB_OFFLINE=1``)::

        python -m nycdata fetch majortom data/original_sources -f params/original.yaml [--dry-run]

    Major-TOM Core holds each 10 km grid cell once: one S2 product and one S1 product of an unrelated date per
    cell, so it gives one date per parent (build with ``temporal_mode: replicate``). Cells are chosen once from
    ``Major-TOM/Core-S2L2A``'s ``metadata.parquet`` (:func:`select_majortom_cells`: bbox, ``max_cloud``,
    optional ``start``..``end`` window; None = no window, which Core, one product per cell, rarely needs); the
    S1RTC and DEM products are matched to those cells by ``grid_cell`` (:func:`match_majortom_cells`). Every
    product is one row group (``parquet_row``) of an image shard (``parquet_url``) whose band columns hold
    GeoTIFF bytes, written unchanged to ``<out_dir>/<grid_cell>/<S2L2A|S1RTC>/<date>_<band>.tif`` and
    ``<out_dir>/<grid_cell>/DEM/DEM.tif``. ``shard_access="range"`` reads only that row group over HTTP range
    requests (``HfFileSystem``); ``"download"`` pulls whole shards (about 4 GB each) into the HF cache. Files on
    disk are not read again; the manifest is updated after each shard, so an interrupted fetch resumes.

    ``hf_endpoint`` is the Hub to ask (None = huggingface_hub's default, i.e. ``HF_ENDPOINT``), ``hf_cache_dir``
    its cache (None = ``HF_HUB_CACHE``). ``hf_download`` / ``open_shard`` replace ``hf_hub_download`` and the
    shard opener.
    """
    out_dir = Path(out_dir)
    _check_majortom_call(collections)
    log(SINGLE_DATE_NOTE)
    hf_download = hf_download or _default_hf_download
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    fetch_metadata = _metadata_fetcher(hf_download, hf_endpoint, hf_cache_dir, retry, log)
    selection = _select_majortom(bbox, start, end, max_cloud, collections, fetch_metadata, log)
    if dry_run:
        plan = majortom_plan(selection)
        log(plan_table(plan))
        _log_majortom_end(selection, log)
        return plan
    opener = open_shard or _shard_opener(shard_access, hf_download, hf_endpoint, hf_cache_dir)
    for collection, rows in selection.items():
        log(f"{MAJORTOM_ORG}/{collection}: {len(rows)} products to fetch")
        _fetch_collection(collection, rows, opener, out_dir, retry, log)
    manifest = out_dir / MANIFEST_FILE
    if not manifest.exists():
        write_manifest([], out_dir)
    _log_majortom_end(selection, log)
    log(fetched_table(read_manifest(out_dir), out_dir))
    return manifest


def _log_majortom_end(selection: Mapping[str, pd.DataFrame], log: Log) -> None:
    s1 = selection.get("Core-S1RTC")
    gaps = "" if s1 is None or s1.empty else (
        f"; S1-to-S2 gaps {int(s1['gap_days'].abs().min())}..{int(s1['gap_days'].abs().max())} d "
        f"(median {int(s1['gap_days'].abs().median())} d)")
    log(f"Major-TOM Core: one S2 date per cell, so build with temporal_mode: replicate{gaps}")
