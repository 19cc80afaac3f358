"""Network-facing fetchers: raw Sentinel-2 / Sentinel-1 / DEM / WorldCover files for the NYC study area.

Fetching is the only step that needs internet. It writes plain GeoTIFFs under
one folder plus a sources manifest, ``sources.csv``; the builder reads only
that folder. On a machine without internet run the fetch on a connected
machine and copy the whole folder (files + ``sources.csv``) over.

Sources, each a function with its exact command in its docstring:

* :func:`fetch_majortom` -- Major-TOM Core datasets on Hugging Face
  (``Major-TOM/Core-S2L2A``, ``Core-S1RTC``, ``Core-DEM``). Core is
  single-date: it holds each ~10 km grid cell once, with one S2 product
  (2018-2021 acquisitions, plus reprocessed ``N9999`` ones) and one S1 product
  whose date is unrelated to the S2 one. It is not a time series: one date per
  parent, so build it with ``temporal_mode: replicate`` (``params/original.yaml``).
  Cells are chosen once from the S2 metadata; S1 and DEM follow by grid cell.
* :func:`fetch_worldcover` -- ESA WorldCover 2021 v200 label tiles.
* the default, multi-date chain lives in :mod:`nycdata.sources.stac` (Planetary
  Computer: S2 dates over the season, S1 matched to them, DEM, WorldCover).

All are resumable: files already on disk are skipped, HTTP downloads
continue from their ``.part`` file, and :func:`write_manifest` merges with an
existing ``sources.csv`` instead of duplicating rows. ``dry_run=True``
(:func:`fetch_majortom`, :func:`fetch_worldcover`) logs the plan -- cells,
dates, products, cloud, estimated sizes (:func:`nycdata.sources.plan.plan_table`)
-- and writes nothing; a real fetch logs bytes as they come and ends with
:func:`nycdata.sources.plan.fetched_table`.

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
(the builder uses ``processing_baseline``), STAC bands keep their native
10/20/60 m grids (the builder resamples).
"""

from __future__ import annotations

import csv
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence
from urllib.parse import unquote

import pandas as pd

from nycdata.sources.manifest import ALL_PARENTS, MANIFEST_COLUMNS, MANIFEST_FILE, MODALITY_BANDS, NYC_BBOX, SOURCE_MODALITIES
from nycdata.sources.plan import ByteProgress, PlannedFile, fetched_table, human_bytes, plan_table, raster_bytes

Log = Callable[[str], None]

MANIFEST_NAME = MANIFEST_FILE
MANIFEST_KEY: tuple[str, ...] = ("parent_id", "modality", "date", "band")
S2_BANDS: tuple[str, ...] = MODALITY_BANDS["S2L2A"]
S1_BANDS: tuple[str, ...] = MODALITY_BANDS["S1RTC"]
MODALITIES: tuple[str, ...] = SOURCE_MODALITIES
DATED_MODALITIES = ("S2L2A", "S1RTC")

OFFLINE_HINT = ("Fetching needs internet: run the fetch on a connected machine, then copy the output folder "
                "together with its sources.csv to this one.")


class OfflineError(RuntimeError):
    """Every attempt to reach a remote source failed on a connection error: the machine appears offline."""


class DownloadError(RuntimeError):
    """A remote source answered, but not with the data (HTTP 4xx, or 5xx on every attempt)."""


# --------------------------------------------------------------------------- manifest

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def _cloud_text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    number = float(value)
    return "" if math.isnan(number) else repr(number)


def _normalise_row(row: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(row) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"manifest row has unknown columns {sorted(unknown)}; columns are {list(MANIFEST_COLUMNS)}")
    out = {col: _text(row.get(col)) for col in MANIFEST_COLUMNS}
    out["cloud_cover"] = _cloud_text(row.get("cloud_cover"))
    where = f"manifest row {out}"
    if not out["parent_id"]:
        raise ValueError(f"{where}: parent_id is empty")
    if out["modality"] not in MODALITY_BANDS:
        raise ValueError(f"{where}: modality {out['modality']!r} not one of {list(MODALITIES)}")
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


def _sort_key(row: Mapping[str, str]) -> tuple:
    bands = MODALITY_BANDS.get(row["modality"], ())
    band_rank = bands.index(row["band"]) if row["band"] in bands else -1
    modality_rank = MODALITIES.index(row["modality"]) if row["modality"] in MODALITIES else len(MODALITIES)
    return (row["parent_id"], modality_rank, row["date"], band_rank, row["band"])


def read_manifest(out_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``out_dir/sources.csv`` as dicts of strings (``[]`` when there is none). Values stay text: "04.00" stays "04.00"."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not {list(MANIFEST_COLUMNS)}")
        return [{col: row[col] or "" for col in MANIFEST_COLUMNS} for row in reader]


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
        clean = _normalise_row(row)
        merged[tuple(clean[k] for k in MANIFEST_KEY)] = clean
    target = out_dir / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(merged.values(), key=_sort_key))
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- small pure helpers

_BASELINE_RE = re.compile(r"_N(\d{2})(\d{2})(?=_|\.|$)")


def parse_processing_baseline(product_id: str | None) -> str:
    """``S2A_MSIL2A_20210615T154911_N0300_R054_T18TWL_20210615T200409`` -> ``"03.00"``; no ``_Nxxxx`` token -> ``""``."""
    match = _BASELINE_RE.search(product_id or "")
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def normalise_baseline(value: Any) -> str:
    """A STAC ``s2:processing_baseline`` (``"04.00"``, ``"4.0"``, ``4``, ``"N0400"``) as ``"04.00"``; unknown -> ``""``."""
    text = _text(value).strip()
    if not text:
        return ""
    if re.fullmatch(r"N?\d{4}", text):
        digits = text.lstrip("N")
        return f"{digits[:2]}.{digits[2:]}"
    try:
        return f"{float(text):05.2f}"
    except ValueError:
        return ""


def _iso_date(value: Any) -> str:
    return pd.Timestamp(value).date().isoformat()


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    if len(bbox) != 4:
        raise ValueError(f"bbox must be (lon_min, lat_min, lon_max, lat_max), got {bbox!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise ValueError(f"bbox must be (lon_min, lat_min, lon_max, lat_max) in degrees with min <= max, got {bbox!r}")
    return x0, y0, x1, y1


def _safe_name(name: str, what: str) -> str:
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"{what} {name!r} cannot be used as a folder name")
    return name


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- retries and classification

class _Transient(Exception):
    """Internal: one attempt failed in a way worth retrying. kind: connection | server | interrupted."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                  requests.exceptions.ChunkedEncodingError]
    except ImportError:  # pragma: no cover - requests is in the lock file
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError

        types.append(LocalEntryNotFoundError)  # what hf_hub_download raises when it cannot reach the Hub
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_GDAL_CONNECTION_RE = re.compile(r"could not resolve|couldn't resolve|couldn't connect|could not connect|"
                                 r"timed out|connection (reset|refused|timed)|network is unreachable|curl error",
                                 re.IGNORECASE)
_GDAL_SERVER_RE = re.compile(r"HTTP (response )?code:? ?(5\d\d|429)", re.IGNORECASE)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, _connection_error_types())


def _failure_kind(exc: BaseException) -> str | None:
    """``connection``, ``server`` or ``interrupted`` for a failure worth retrying, None for one that is not."""
    if isinstance(exc, _Transient):
        return exc.kind
    if isinstance(exc, (OfflineError, DownloadError)):
        return None
    if _is_connection_error(exc):
        return "connection"
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests / httpx / huggingface_hub HTTP errors
    if isinstance(status, int):
        return "server" if status == 429 or status >= 500 else None
    if type(exc).__module__.startswith("rasterio"):  # GDAL /vsicurl/ errors only say it in words
        message = str(exc)
        if _GDAL_SERVER_RE.search(message):
            return "server"
        if _GDAL_CONNECTION_RE.search(message):
            return "connection"
    return None


def _retry(fn: Callable[[], Any], what: str, *, retries: int = 5, backoff: float = 1.0,
           sleep: Callable[[float], Any] = time.sleep, log: Log | None = None) -> Any:
    """Call ``fn`` up to ``retries + 1`` times, sleeping ``backoff * 2**attempt`` between failures worth retrying.

    Raises :class:`OfflineError` when every attempt failed on a connection
    error, :class:`DownloadError` when some reached a server but all failed;
    any other exception propagates at once.
    """
    kinds: list[str] = []
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right below
            kind = _failure_kind(exc)
            if kind is None:
                raise
            kinds.append(kind)
            last = exc
            detail = exc.detail if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"
            if attempt == retries:
                break
            delay = backoff * 2 ** attempt
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, 300.0))
            if log:
                log(f"  {what}: attempt {attempt + 1}/{retries + 1} failed ({detail}); retrying in {delay:g} s")
            sleep(delay)
    detail = last.detail if isinstance(last, _Transient) else f"{type(last).__name__}: {last}"
    if all(k == "connection" for k in kinds):
        raise OfflineError(f"could not reach {what} after {len(kinds)} attempts (last: {detail}); this machine "
                           f"appears to be offline. {OFFLINE_HINT}") from last
    raise DownloadError(f"{what}: gave up after {len(kinds)} attempts (last: {detail})") from last


# --------------------------------------------------------------------------- HTTP download

class Response(Protocol):
    status_code: int
    headers: Mapping[str, str]

    def iter_content(self, chunk_size: int = ...) -> Iterable[bytes]: ...

    def raise_for_status(self) -> Any: ...


class Session(Protocol):
    """What :func:`download` needs of an HTTP session: ``requests.Session`` satisfies it as is. A ``head``
    method, when the session has one, gives :func:`remote_size` a plan's file sizes."""

    def get(self, url: str, headers: Mapping[str, str] | None = ..., stream: bool = ..., timeout: float = ...) -> Response: ...


class _HttpxResponse:
    def __init__(self, response):
        self._response = response
        self.status_code = response.status_code
        self.headers = response.headers

    def iter_content(self, chunk_size: int = 1 << 20):
        return self._response.iter_bytes(chunk_size)

    def raise_for_status(self):
        return self._response.raise_for_status()

    def close(self):
        self._response.close()


class _HttpxSession:
    """``requests``-style ``get(url, headers, stream, timeout)`` over an ``httpx.Client`` (used only without requests)."""

    def __init__(self):
        import httpx

        self._client = httpx.Client(follow_redirects=True)

    def get(self, url, headers=None, stream=True, timeout=60):
        request = self._client.build_request("GET", url, headers=headers, timeout=timeout)
        return _HttpxResponse(self._client.send(request, stream=True))

    def head(self, url, timeout=30, allow_redirects=True):
        return _HttpxResponse(self._client.head(url, timeout=timeout, follow_redirects=allow_redirects))


def default_session() -> Session:
    """A ``requests.Session`` when requests is installed, else an httpx adapter with the same ``get``."""
    try:
        import requests
    except ImportError:  # pragma: no cover - requests is in the lock file
        return _HttpxSession()
    session = requests.Session()
    session.headers["User-Agent"] = "nycdata-fetch (+https://github.com/)"
    return session


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _content_range(headers) -> tuple[int | None, int | None]:
    """(start, total) from ``Content-Range: bytes START-END/TOTAL`` or ``bytes */TOTAL``."""
    value = _header(headers, "Content-Range") or ""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _retry_after(headers) -> float | None:
    value = _header(headers, "Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def download(url: str, dest: str | Path, session: Session | None = None, retries: int = 5, backoff: float = 1.0,
             timeout: float = 60, sleep: Callable[[float], Any] = time.sleep, log: Log | None = None,
             chunk_size: int = 1 << 20, progress_every_s: float = 5.0) -> Path:
    """Download ``url`` to ``dest``, resumably; return ``dest``.

    * ``dest`` already there: nothing is requested.
    * Bytes go to ``dest.tif.part`` (``dest`` + ``.part``); if a part file
      exists the request carries ``Range: bytes=<size>-``. ``206`` appends,
      ``200`` (server ignored the range) starts the part over; ``416`` with the
      part already complete finishes. When the body is done (length checked
      against Content-Length / Content-Range) the part is renamed onto ``dest``.
    * Connection errors, timeouts, a stream cut short, HTTP 5xx and 429 are
      retried ``retries`` times after the first attempt, sleeping
      ``backoff * 2**attempt`` (1, 2, 4, ... s; at least ``Retry-After``);
      the part file is kept, so a retry resumes. Any other 4xx raises
      :class:`DownloadError` at once.
    * Every attempt failing on a connection error raises :class:`OfflineError`.
    * Progress goes to ``log`` through :class:`ByteProgress` (at most every
      ``progress_every_s`` seconds; bytes resumed from the part file count as
      already done), then one final line.
    """
    dest = Path(dest)
    if dest.exists():
        if log:
            log(f"  skip {dest.name}: already downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    session = session if session is not None else default_session()
    progress: list[ByteProgress] = []  # the last attempt's, for the final line

    def track(total: int | None, start: int) -> ByteProgress:
        progress[:] = [ByteProgress(dest.name, total, log, every_s=progress_every_s, start=start)]
        return progress[0]

    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = session.get(url, headers=headers, stream=True, timeout=timeout)
        except Exception as exc:
            if _is_connection_error(exc):
                raise _Transient("connection", f"{type(exc).__name__}: {exc}") from exc
            raise
        try:
            _receive(response, url, part, offset, chunk_size, track, log)
        finally:
            close = getattr(response, "close", None)
            if callable(close):
                close()

    _retry(attempt, url, retries=retries, backoff=backoff, sleep=sleep, log=log)
    os.replace(part, dest)
    if progress:
        progress[0].finish()
    return dest


def _receive(response: Response, url: str, part: Path, offset: int, chunk_size: int,
             track: Callable[[int | None, int], ByteProgress], log: Log | None) -> None:
    """One attempt's answer into ``part``: checks the status and the length, raises :class:`_Transient` to retry."""
    status = int(response.status_code)
    if status == 416 and offset:
        _, total = _content_range(response.headers)
        if total == offset:
            track(total, offset)
            return  # the part file already holds everything
        part.unlink()
        raise _Transient("server", f"HTTP 416 for range from byte {offset}; starting over")
    if status == 429 or 500 <= status < 600:
        raise _Transient("server", f"HTTP {status}", _retry_after(response.headers))
    if status >= 300:
        raise DownloadError(f"{url}: HTTP {status}; not retried")
    expected: int | None = None
    start, total = _content_range(response.headers)
    if status == 206:
        if start is not None and start != offset:
            part.unlink(missing_ok=True)
            raise _Transient("server", f"asked for byte {offset}, server sent from byte {start}; starting over")
        mode, expected = ("ab" if offset else "wb"), total
    else:
        if offset and log:
            log(f"  {part.name}: server ignored the Range request; restarting from byte 0")
        mode = "wb"
        length = _header(response.headers, "Content-Length")
        encoding = (_header(response.headers, "Content-Encoding") or "identity").lower()
        if length is not None and encoding == "identity":
            expected = int(length)
    progress = track(expected, offset if mode == "ab" else 0)
    with open(part, mode) as fh:
        try:
            for chunk in response.iter_content(chunk_size=chunk_size):
                if chunk:
                    fh.write(chunk)
                    progress(len(chunk))
        except Exception as exc:
            if _is_connection_error(exc):
                raise _Transient("interrupted", f"stream cut: {type(exc).__name__}: {exc}") from exc
            raise
    size = part.stat().st_size
    if expected is not None and size != expected:
        if size > expected:
            part.unlink()
        raise _Transient("interrupted", f"got {size} of {expected} bytes")


def remote_size(url: str, session: Session | None = None, timeout: float = 30, log: Log | None = None) -> int | None:
    """The size a server announces for ``url`` (``Content-Length`` of a HEAD request), or None when it does not
    say or cannot be reached: a dry-run plan is still printed, with the size unknown."""
    session = session if session is not None else default_session()
    head = getattr(session, "head", None)
    if head is None:
        return None
    try:
        response = head(url, timeout=timeout, allow_redirects=True)
    except Exception as exc:  # noqa: BLE001 - a plan must not fail on a size
        if log:
            log(f"  {url}: size unknown (HEAD failed: {type(exc).__name__}: {exc})")
        return None
    try:
        length = _header(response.headers, "Content-Length")
        encoding = (_header(response.headers, "Content-Encoding") or "identity").lower()
        if int(response.status_code) >= 300 or length is None or encoding != "identity":
            if log:
                log(f"  {url}: size unknown (HEAD answered HTTP {response.status_code})")
            return None
        return int(length)
    finally:
        close = getattr(response, "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------------- Major-TOM (Hugging Face)

MAJORTOM_ORG = "Major-TOM"
MAJORTOM_S2 = "Core-S2L2A"
MAJORTOM_DEFAULT_COLLECTIONS = ("Core-S2L2A", "Core-S1RTC", "Core-DEM")
# collection -> (modality, {manifest band: column of the image shard}). Shard columns as the dataset cards declare
# them (README `dataset_info` of huggingface.co/datasets/Major-TOM/Core-S2L2A and Core-S1RTC; Core-DEM's viewer):
# S2 product_id, grid_cell, product_datetime, thumbnail, B01..B12 with B8A, cloud_mask; S1 ..., vv, vh; DEM
# grid_cell, thumbnail, compressed, DEM.
MAJORTOM_COLLECTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "Core-S2L2A": ("S2L2A", {band: band for band in S2_BANDS}),
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
_S2_SIDE_PX = {**{b: 534 for b in S2_BANDS}, **{b: 1068 for b in ("B02", "B03", "B04", "B08")},
               **{b: 178 for b in ("B01", "B09")}}
MAJORTOM_FILE_BYTES: dict[tuple[str, str], int] = {
    **{("S2L2A", b): raster_bytes(side, side, 1, 2) for b, side in _S2_SIDE_PX.items()},
    ("S1RTC", "VV"): raster_bytes(1068, 1068, 1, 4), ("S1RTC", "VH"): raster_bytes(1068, 1068, 1, 4),
    ("DEM", "DEM"): raster_bytes(356, 356, 1, 4),
}
REPROCESSED_BASELINE = "99.99"  # product ids with _N9999_: CloudFerro reprocessings, Sen2Cor version unknown
SINGLE_DATE_NOTE = ("Major-TOM Core is single-date: it holds each grid cell once, one S2 product per cell (2018-2021 "
                    "acquisitions and reprocessed ones) and one S1 product whose date is unrelated to the S2 one. "
                    "Build it with temporal_mode: replicate (as params/original.yaml does); T distinct dates need a "
                    "multi-date source.")


def read_majortom_metadata(path: str | Path, collection: str) -> pd.DataFrame:
    """The columns of a Major-TOM ``metadata.parquet`` that :data:`MAJORTOM_NEEDED_COLUMNS` lists; a missing one
    (Major-TOM renamed it?) is a ValueError naming the column and the file."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in MAJORTOM_NEEDED_COLUMNS[collection] if c not in names]
    if missing:
        raise ValueError(f"{MAJORTOM_ORG}/{collection} metadata.parquet ({path}) lacks column(s) {missing}; it has "
                         f"{names}. If Major-TOM renamed them, update MAJORTOM_NEEDED_COLUMNS in nycdata/sources/fetch.py")
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
    x0, y0, x1, y1 = _check_bbox(bbox)
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
                                 product_id=_text(getattr(row, "product_id", "")),
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
    cell = _safe_name(str(row.grid_cell), "grid_cell")
    date = row.date if modality != "DEM" else ""
    product_id = _text(getattr(row, "product_id", ""))
    targets = _majortom_targets(modality, cell, date, band_columns)
    todo = {b: p for b, p in targets.items() if not (out_dir / p).exists()}
    if todo:
        index = int(row.parquet_row)
        table = _retry(lambda: shard.read(index, [band_columns[b] for b in todo]),
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
        path = _retry(lambda: hf_download(repo_id=repo_id, repo_type="dataset", filename="metadata.parquet",
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

        python -c "from nycdata.sources.fetch import fetch_majortom; fetch_majortom('data/raw')"

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
    manifest = out_dir / MANIFEST_NAME
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


# --------------------------------------------------------------------------- ESA WorldCover

WORLDCOVER_URL = ("https://esa-worldcover.s3.eu-central-1.amazonaws.com/v200/2021/map/"
                  "ESA_WorldCover_10m_2021_v200_{tile}_Map.tif")
WORLDCOVER_TILE_DEG = 3


def _tile_starts(lo: float, hi: float, step: int) -> list[int]:
    first = math.floor(lo / step) * step
    starts = [first]
    while starts[-1] + step < hi:  # a bbox edge exactly on a tile edge does not pull in the next tile
        starts.append(starts[-1] + step)
    return starts


def worldcover_tile_name(lat: int, lon: int) -> str:
    """Name of the 3x3-degree tile with lower-left corner (lat, lon): (39, -75) -> ``N39W075``."""
    return f"{'N' if lat >= 0 else 'S'}{abs(lat):02d}{'E' if lon >= 0 else 'W'}{abs(lon):03d}"


def worldcover_tiles(bbox: Sequence[float]) -> list[str]:
    """WorldCover 3x3-degree tiles covering lon/lat ``bbox``, south to north, west to east. NYC -> ``["N39W075"]``."""
    x0, y0, x1, y1 = _check_bbox(bbox)
    return [worldcover_tile_name(lat, lon)
            for lat in _tile_starts(y0, y1, WORLDCOVER_TILE_DEG) for lon in _tile_starts(x0, x1, WORLDCOVER_TILE_DEG)]


def _mosaic_worldcover(tiles: Sequence[Path], bbox: Sequence[float], dest: Path) -> Path:
    import rasterio
    from rasterio.merge import merge

    sources = [rasterio.open(p) for p in tiles]
    try:
        data, transform = merge(sources, bounds=tuple(bbox))
        profile = dict(driver="GTiff", dtype=data.dtype.name, count=data.shape[0], height=data.shape[1],
                       width=data.shape[2], crs=sources[0].crs, transform=transform, nodata=sources[0].nodata,
                       compress="deflate")
    finally:
        for src in sources:
            src.close()
    if profile["width"] >= 256 and profile["height"] >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as out:
        out.write(data)
    os.replace(tmp, dest)
    return dest


def _worldcover_product(tile: str) -> str:
    return f"ESA_WorldCover_10m_2021_v200_{tile}"


def plan_worldcover(bbox: Sequence[float] = NYC_BBOX, log: Log | None = print, *, url_template: str = WORLDCOVER_URL,
                    session: Session | None = None) -> list[PlannedFile]:
    """What :func:`fetch_worldcover` would download: one :class:`PlannedFile` per tile, its size from a HEAD
    request's ``Content-Length`` (None when the server does not say or cannot be reached)."""
    tiles = worldcover_tiles(bbox)
    session = session if session is not None else default_session()
    note = "label 2021 v200" + ("" if len(tiles) == 1 else f"; one of {len(tiles)} tiles, mosaicked over the bbox")
    return [PlannedFile(source="esa-worldcover", parent_id=ALL_PARENTS, modality="WORLDCOVER", date="",
                        product_id=_worldcover_product(tile), cloud_cover=None,
                        est_bytes=remote_size(url_template.format(tile=tile), session, log=log), note=note)
            for tile in tiles]


def fetch_worldcover(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, log: Log = print, *,
                     dry_run: bool = False, url_template: str = WORLDCOVER_URL, session: Session | None = None,
                     retries: int = 5, backoff: float = 1.0,
                     sleep: Callable[[float], Any] = time.sleep) -> Path | list[PlannedFile]:
    """Download the ESA WorldCover 2021 v200 tiles covering ``bbox``; return ``out_dir/sources.csv`` (with
    ``dry_run``: the planned tiles, logged as a table, and nothing is written).

    Command (needs internet)::

        python -c "from nycdata.sources.fetch import fetch_worldcover; fetch_worldcover('data/raw')"

    Tiles (:func:`worldcover_tiles`; NYC: ``N39W075``) come from the public
    bucket, ``url_template`` (default :data:`WORLDCOVER_URL`; ``{tile}`` is
    filled in), via :func:`download` (resumable, retried, byte progress)
    into ``<out_dir>/WORLDCOVER/``. The manifest gets one WORLDCOVER row with
    parent_id ``*``: the label applies to every parent, and the builder clips
    it to each parent's footprint. A bbox spanning several tiles is first
    mosaicked (clipped to ``bbox``) into one file, because the manifest key
    (``*``, WORLDCOVER, "", "") holds exactly one file.
    """
    out_dir = Path(out_dir)
    bbox = _check_bbox(bbox)
    session = session if session is not None else default_session()
    if dry_run:
        plan = plan_worldcover(bbox, log, url_template=url_template, session=session)
        log(plan_table(plan))
        return plan
    tiles = worldcover_tiles(bbox)
    paths = []
    for n, tile in enumerate(tiles, 1):
        url = url_template.format(tile=tile)
        log(f"WorldCover [{n}/{len(tiles)}] tile {tile}: {url}")
        paths.append(download(url, out_dir / "WORLDCOVER" / f"{_worldcover_product(tile)}_Map.tif", session=session,
                              retries=retries, backoff=backoff, sleep=sleep, log=log))
    if len(paths) == 1:
        rel, product = f"WORLDCOVER/{paths[0].name}", _worldcover_product(tiles[0])
    else:
        tag = "_".join(f"{v:.3f}" for v in bbox).replace("-", "m")
        rel = f"WORLDCOVER/ESA_WorldCover_10m_2021_v200_mosaic_{tag}.tif"
        if not (out_dir / rel).exists():
            log(f"WorldCover: mosaicking {len(paths)} tiles over the bbox into {rel}")
            _mosaic_worldcover(paths, bbox, out_dir / rel)
        product = "ESA_WorldCover_10m_2021_v200_" + "+".join(tiles)
    manifest = write_manifest([dict(parent_id=ALL_PARENTS, modality="WORLDCOVER", date="", band="", path=rel,
                                    cloud_cover=None, processing_baseline="", product_id=product)], out_dir)
    log(fetched_table(read_manifest(out_dir), out_dir))
    return manifest
