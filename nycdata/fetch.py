"""Network-facing fetchers: raw Sentinel-2 / Sentinel-1 / DEM / WorldCover files for the NYC study area.

Fetching is the only step that needs internet. It writes plain GeoTIFFs under
one folder plus a sources manifest, ``sources.csv``; the builder reads only
that folder. On a machine without internet run the fetch on a connected
machine and copy the whole folder (files + ``sources.csv``) over.

Three sources, each a function with its exact command in its docstring:

* :func:`fetch_majortom` -- Major-TOM Core datasets on Hugging Face
  (``Major-TOM/Core-S2L2A``, ``Core-S1RTC``, ``Core-DEM``): one file per band,
  per grid cell and date.
* :func:`fetch_stac` -- Sentinel-2 L2A from a STAC API (Element 84
  earth-search by default), each band clipped to the AOI window.
* :func:`fetch_worldcover` -- ESA WorldCover 2021 v200 label tiles.

All three are resumable: files already on disk are skipped, HTTP downloads
continue from their ``.part`` file, and :func:`write_manifest` merges with an
existing ``sources.csv`` instead of duplicating rows.

``sources.csv`` (one row per file; every value is text, empty = unknown/none):

=====================  ==========================================================
``parent_id``          Major-TOM grid cell (``433U_1055L``), MGRS tile (``18TWL``),
                       or ``*`` = applies to every parent (WorldCover; the
                       builder clips it to each parent's footprint)
``modality``           ``S2L2A``, ``S1RTC``, ``DEM`` or ``WORLDCOVER``
``date``               acquisition date ``YYYY-MM-DD``; empty for DEM and WORLDCOVER
``band``               ``B01`` ... ``B12`` (with ``B8A``), ``VV``/``VH``, ``DEM``;
                       empty when the file holds every band of the modality in
                       canonical order
``path``               file path relative to the manifest's folder (``/``-separated)
``cloud_cover``        scene / cell cloud percentage, or empty
``processing_baseline`` Sentinel-2 baseline such as ``04.00``, or empty
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

from nycdata.sources import ALL_PARENTS, MANIFEST_COLUMNS, MANIFEST_FILE, MODALITY_BANDS, NYC_BBOX, SOURCE_MODALITIES

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
    """What :func:`download` needs of an HTTP session: ``requests.Session`` satisfies it as is."""

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
             chunk_size: int = 1 << 20) -> Path:
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
    """
    dest = Path(dest)
    if dest.exists():
        if log:
            log(f"  skip {dest.name}: already downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    session = session if session is not None else default_session()

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
            status = int(response.status_code)
            if status == 416 and offset:
                _, total = _content_range(response.headers)
                if total == offset:
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
                    log(f"  {dest.name}: server ignored the Range request; restarting from byte 0")
                mode = "wb"
                length = _header(response.headers, "Content-Length")
                encoding = (_header(response.headers, "Content-Encoding") or "identity").lower()
                if length is not None and encoding == "identity":
                    expected = int(length)
            with open(part, mode) as fh:
                try:
                    for chunk in response.iter_content(chunk_size=chunk_size):
                        if chunk:
                            fh.write(chunk)
                except Exception as exc:
                    if _is_connection_error(exc):
                        raise _Transient("interrupted", f"stream cut: {type(exc).__name__}: {exc}") from exc
                    raise
            size = part.stat().st_size
            if expected is not None and size != expected:
                if size > expected:
                    part.unlink()
                raise _Transient("interrupted", f"got {size} of {expected} bytes")
        finally:
            close = getattr(response, "close", None)
            if callable(close):
                close()

    _retry(attempt, url, retries=retries, backoff=backoff, sleep=sleep, log=log)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- Major-TOM (Hugging Face)

MAJORTOM_ORG = "Major-TOM"
# collection -> (modality, {manifest band: column in the image parquet})
MAJORTOM_COLLECTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "Core-S2L2A": ("S2L2A", {band: band for band in S2_BANDS}),
    "Core-S1RTC": ("S1RTC", {"VV": "vv", "VH": "vh"}),
    "Core-DEM": ("DEM", {"DEM": "DEM"}),
}
MAJORTOM_METADATA_COLUMNS = ("grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover",
                             "nodata", "centre_lat", "centre_lon", "parquet_url", "parquet_row")


def select_majortom_rows(metadata: pd.DataFrame, bbox: Sequence[float] = NYC_BBOX, start: str | None = None,
                         end: str | None = None, max_cloud: float | None = None) -> pd.DataFrame:
    """The rows of a Major-TOM ``metadata.parquet`` to fetch, sorted by (grid_cell, date).

    Keeps grid cells whose centre (``centre_lon``, ``centre_lat``) lies in
    ``bbox`` (edges included); if the frame has ``timestamp``, dates from
    ``start`` to ``end`` inclusive (either may be None = open); if it has
    ``cloud_cover`` and ``max_cloud`` is not None, ``cloud_cover <= max_cloud``
    (unknown cloud is dropped). Adds ``date`` (ISO, ``""`` without a
    timestamp). Where one cell has several products on one date (tile
    overlaps), only the least cloudy is kept, so (cell, date) is unique.
    """
    missing = [c for c in ("grid_cell", "centre_lat", "centre_lon") if c not in metadata.columns]
    if missing:
        raise ValueError(f"Major-TOM metadata lacks columns {missing}; it has {list(metadata.columns)}")
    x0, y0, x1, y1 = _check_bbox(bbox)
    df = metadata
    keep = df["centre_lon"].between(x0, x1) & df["centre_lat"].between(y0, y1)
    df = df.loc[keep].copy()
    if "timestamp" in df.columns:
        stamps = pd.to_datetime(df["timestamp"].astype(str), utc=True, format="mixed")
        df["date"] = stamps.dt.strftime("%Y-%m-%d")
        if start is not None:
            df = df.loc[df["date"] >= _iso_date(start)]
        if end is not None:
            df = df.loc[df["date"] <= _iso_date(end)]
    else:
        df["date"] = ""
    order = ["grid_cell", "date"]
    if "cloud_cover" in df.columns:
        if max_cloud is not None:
            df = df.loc[pd.to_numeric(df["cloud_cover"], errors="coerce") <= float(max_cloud)]
        order.append("cloud_cover")
    df = df.sort_values(order, kind="stable").drop_duplicates(["grid_cell", "date"], keep="first")
    return df.sort_values(["grid_cell", "date"], kind="stable").reset_index(drop=True)


_HF_URL_RE = re.compile(r"^https?://huggingface\.co/datasets/([^/]+/[^/]+)/resolve/([^/]+)/([^?#]+)")


def parse_hf_url(url: str) -> tuple[str, str, str]:
    """``https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_00001.parquet``
    -> ``("Major-TOM/Core-S2L2A", "main", "images/part_00001.parquet")``."""
    match = _HF_URL_RE.match(url)
    if not match:
        raise ValueError(f"not a Hugging Face dataset file URL: {url!r}")
    return match.group(1), unquote(match.group(2)), unquote(match.group(3))


def _hf_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _default_hf_download(**kwargs) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(**kwargs)


def _shard_opener(mode: str, hf_download: Callable[..., str]) -> Callable[[str], Any]:
    """``range``: open the shard through ``HfFileSystem`` (HTTP range reads of the footer and the wanted row
    group only). ``download``: fetch the whole shard into the Hugging Face cache with ``hf_hub_download``."""
    if mode == "range":
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()

        def open_range(url: str):
            repo_id, revision, filename = parse_hf_url(url)
            return fs.open(f"datasets/{repo_id}@{revision}/{filename}", "rb", block_size=1 << 22)

        return open_range
    if mode == "download":
        def open_download(url: str):
            repo_id, revision, filename = parse_hf_url(url)
            return hf_download(repo_id=repo_id, repo_type="dataset", filename=filename, revision=revision)

        return open_download
    raise ValueError(f"shard_access must be 'range' or 'download', got {mode!r}")


def _majortom_targets(modality: str, cell: str, date: str, bands: Iterable[str]) -> dict[str, str]:
    """{band: path relative to out_dir} for one selected row."""
    if modality == "DEM":
        return {band: f"{cell}/DEM/DEM.tif" for band in bands}
    return {band: f"{cell}/{modality}/{date}_{band}.tif" for band in bands}


def _read_metadata(path: str | Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in MAJORTOM_METADATA_COLUMNS if c in names])


def fetch_majortom(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, start: str = "2020-01-01",
                   end: str = "2025-12-31", max_cloud: float = 30.0,
                   collections: Sequence[str] = ("Core-S2L2A", "Core-S1RTC", "Core-DEM"), log: Log = print, *,
                   shard_access: str = "range", retries: int = 5, backoff: float = 1.0,
                   sleep: Callable[[float], Any] = time.sleep, hf_download: Callable[..., str] | None = None,
                   open_shard: Callable[[str], Any] | None = None) -> Path:
    """Fetch Major-TOM Core S2L2A / S1RTC / DEM over ``bbox`` into ``out_dir``; return ``out_dir/sources.csv``.

    Command (on a machine with internet; nothing is fetched with ``HF_HUB_OFFLINE=1``)::

        python -c "from nycdata.fetch import fetch_majortom; fetch_majortom('data/raw')"

    For each collection, ``hf_hub_download(repo_id="Major-TOM/<collection>",
    repo_type="dataset", filename="metadata.parquet")`` (cached by
    huggingface_hub), then :func:`select_majortom_rows` (S2: cloud and dates;
    S1RTC: dates; DEM: cells only). Every selected product is one row group
    (``parquet_row``) of an image shard (``parquet_url``); its band columns
    hold GeoTIFF bytes, written unchanged to
    ``<out_dir>/<grid_cell>/<S2L2A|S1RTC>/<date>_<band>.tif`` and
    ``<out_dir>/<grid_cell>/DEM/DEM.tif``. ``shard_access="range"`` reads only
    that row group over HTTP range requests (``HfFileSystem``);
    ``"download"`` pulls whole shards into the HF cache (resumable, but
    shards are large). A product whose files all exist is not read again;
    the manifest is updated after each shard, so an interrupted fetch resumes.

    ``hf_download`` / ``open_shard`` replace ``hf_hub_download`` and the shard
    opener (tests use local files).
    """
    out_dir = Path(out_dir)
    unknown = [c for c in collections if c not in MAJORTOM_COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown Major-TOM collections {unknown}; choose from {list(MAJORTOM_COLLECTIONS)}")
    repos = ", ".join(f"{MAJORTOM_ORG}/{c}" for c in collections)
    if _hf_offline_requested():
        raise OfflineError(f"HF_HUB_OFFLINE=1 is set, so {repos} cannot be fetched from Hugging Face: this machine "
                           f"appears to be offline (or is told to be). {OFFLINE_HINT} Unset HF_HUB_OFFLINE to fetch.")
    hf_download = hf_download or _default_hf_download
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    manifest = out_dir / MANIFEST_NAME

    for collection in collections:
        modality, band_columns = MAJORTOM_COLLECTIONS[collection]
        repo_id = f"{MAJORTOM_ORG}/{collection}"
        log(f"Major-TOM {repo_id}: metadata.parquet")
        meta_path = _retry(lambda: hf_download(repo_id=repo_id, repo_type="dataset", filename="metadata.parquet"),
                           f"Hugging Face dataset {repo_id} (metadata.parquet)", **retry)
        metadata = _read_metadata(meta_path)
        if modality == "DEM":
            selected = select_majortom_rows(metadata.drop(columns=["timestamp"], errors="ignore"), bbox)
        elif modality == "S1RTC":
            selected = select_majortom_rows(metadata, bbox, start, end)
        else:
            selected = select_majortom_rows(metadata, bbox, start, end, max_cloud)
        total = len(selected)
        log(f"Major-TOM {repo_id}: {total} products in {selected['grid_cell'].nunique()} cells")
        if total == 0:
            continue
        opener = open_shard or _shard_opener(shard_access, hf_download)
        done = 0
        for url, group in selected.groupby("parquet_url", sort=False):
            rows: list[dict] = []
            shard: dict[str, Any] = {}

            def read_row_group(index: int, columns: list[str], _url=url, _shard=shard):
                import pyarrow.parquet as pq

                try:
                    if "pf" not in _shard:
                        _shard["handle"] = opener(_url)
                        _shard["pf"] = pq.ParquetFile(_shard["handle"])
                    names = set(_shard["pf"].schema_arrow.names)
                    wanted = columns + [c for c in ("grid_cell",) if c in names and c not in columns]
                    return _shard["pf"].read_row_group(index, columns=wanted)
                except Exception:
                    _close_shard(_shard)  # reopen on the next attempt
                    raise

            try:
                for record in group.itertuples(index=False):
                    done += 1
                    cell = _safe_name(str(record.grid_cell), "grid_cell")
                    targets = _majortom_targets(modality, cell, record.date, band_columns)
                    todo = {b: p for b, p in targets.items() if not (out_dir / p).exists()}
                    where = f"[{done}/{total}] {modality} cell {cell}" + (f" {record.date}" if record.date else "")
                    if todo:
                        columns = [band_columns[b] for b in todo]
                        index = int(record.parquet_row)
                        table = _retry(lambda: read_row_group(index, columns), f"{url} row group {index}", **retry)
                        if "grid_cell" in table.column_names and str(table["grid_cell"][0].as_py()) != cell:
                            raise ValueError(f"{url} row group {index} holds grid cell "
                                             f"{table['grid_cell'][0].as_py()!r}, metadata says {cell!r}")
                        for band, rel in todo.items():
                            value = table[band_columns[band]][0].as_py()
                            if not value:
                                raise ValueError(f"{url} row group {index}: column {band_columns[band]!r} is empty")
                            _write_bytes_atomic(out_dir / rel, value)
                        log(f"{where}: wrote {len(todo)} of {len(targets)} files")
                    else:
                        log(f"{where}: all {len(targets)} files already there, skipped")
                    product_id = _text(getattr(record, "product_id", ""))
                    cloud = getattr(record, "cloud_cover", None) if modality == "S2L2A" else None
                    baseline = parse_processing_baseline(product_id) if modality == "S2L2A" else ""
                    rows += [dict(parent_id=cell, modality=modality, date=record.date if modality != "DEM" else "",
                                  band=band, path=rel, cloud_cover=cloud, processing_baseline=baseline,
                                  product_id=product_id) for band, rel in targets.items()]
            finally:
                _close_shard(shard)
                if rows:
                    write_manifest(rows, out_dir)
    if not manifest.exists():
        write_manifest([], out_dir)
    log(f"Major-TOM: manifest {manifest}")
    return manifest


def _close_shard(shard: dict) -> None:
    shard.pop("pf", None)
    handle = shard.pop("handle", None)
    close = getattr(handle, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a broken remote file must not hide the real error
            pass


# --------------------------------------------------------------------------- STAC (earth-search)

EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
EARTH_SEARCH_S2_ASSETS: dict[str, str] = {
    "coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05", "rededge2": "B06",
    "rededge3": "B07", "nir": "B08", "nir08": "B8A", "nir09": "B09", "swir16": "B11", "swir22": "B12",
}
_GDAL_REMOTE_ENV = dict(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", AWS_NO_SIGN_REQUEST="YES",
                        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.TIF,.tiff", GDAL_HTTP_MAX_RETRY="3",
                        GDAL_HTTP_RETRY_DELAY="1", VSI_CACHE="TRUE")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def stac_item_record(item: Any) -> dict[str, Any]:
    """What the fetcher needs of one Sentinel-2 STAC item (a ``pystac.Item`` or its dict).

    ``parent_id`` from ``s2:mgrs_tile``, else ``grid:code`` (``MGRS-18TWL`` ->
    ``18TWL``), else ``mgrs:utm_zone`` + ``mgrs:latitude_band`` +
    ``mgrs:grid_square``; ``date`` from ``datetime``; ``cloud_cover`` from
    ``eo:cloud_cover``; ``processing_baseline`` from ``s2:processing_baseline``
    (else the product name); ``hrefs`` {band: href} over the earth-search asset
    keys (``coastal`` -> B01 ... ``swir22`` -> B12; keys already named B01... too).
    """
    props = _get(item, "properties", {}) or {}
    item_id = _text(_get(item, "id", ""))
    parent = _text(props.get("s2:mgrs_tile"))
    if not parent and props.get("grid:code"):
        parent = re.sub(r"^MGRS-", "", str(props["grid:code"]))
    if not parent and props.get("mgrs:utm_zone") is not None:
        parent = f"{int(props['mgrs:utm_zone']):02d}{props.get('mgrs:latitude_band', '')}{props.get('mgrs:grid_square', '')}"
    if not parent:
        raise ValueError(f"STAC item {item_id!r} has no MGRS tile (s2:mgrs_tile / grid:code / mgrs:*)")
    stamp = props.get("datetime") or _get(item, "datetime")
    if not stamp:
        raise ValueError(f"STAC item {item_id!r} has no datetime")
    product = _text(props.get("s2:product_uri")).removesuffix(".SAFE") or item_id
    baseline = normalise_baseline(props.get("s2:processing_baseline")) or parse_processing_baseline(product)
    cloud = props.get("eo:cloud_cover")
    hrefs: dict[str, str] = {}
    for key, asset in (_get(item, "assets", {}) or {}).items():
        band = EARTH_SEARCH_S2_ASSETS.get(key) or (key if key in S2_BANDS else None)
        href = _get(asset, "href")
        if band and href:
            hrefs[band] = href
    return dict(parent_id=_safe_name(parent, "MGRS tile"), date=_iso_date(stamp),
                cloud_cover=None if cloud is None else float(cloud), processing_baseline=baseline,
                product_id=product, hrefs=hrefs)


def select_stac_records(records: Iterable[Mapping[str, Any]], max_cloud: float | None = None) -> list[dict]:
    """Records with ``cloud_cover <= max_cloud`` (unknown cloud kept), one per (tile, date) -- the least
    cloudy, then the one with most bands -- sorted by (tile, date)."""
    best: dict[tuple[str, str], dict] = {}
    for rec in records:
        cloud = rec.get("cloud_cover")
        if max_cloud is not None and cloud is not None and cloud > max_cloud:
            continue
        key = (rec["parent_id"], rec["date"])
        rank = (math.inf if cloud is None else cloud, -len(rec.get("hrefs", {})))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, dict(rec))
    return [best[key][1] for key in sorted(best)]


def clip_to_bbox(src: str | Path, bbox: Sequence[float], dest: str | Path, description: str | None = None) -> Path | None:
    """Read the window of ``src`` (a COG URL or a local file) covering lon/lat ``bbox`` and write it to ``dest``.

    The window is in the raster's own grid and CRS (no resampling), widened
    to whole pixels and cut to the raster's extent; ``None`` (nothing
    written) when the bbox misses the raster. Written via a temporary file.
    """
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds

    x0, y0, x1, y1 = _check_bbox(bbox)
    dest = Path(dest)
    with rasterio.Env(**_GDAL_REMOTE_ENV), rasterio.open(str(src)) as ds:
        left, bottom, right, top = transform_bounds("EPSG:4326", ds.crs, x0, y0, x1, y1, densify_pts=21)
        win = from_bounds(left, bottom, right, top, transform=ds.transform)
        col0 = max(0, math.floor(win.col_off + 1e-9))
        row0 = max(0, math.floor(win.row_off + 1e-9))
        col1 = min(ds.width, math.ceil(win.col_off + win.width - 1e-9))
        row1 = min(ds.height, math.ceil(win.row_off + win.height - 1e-9))
        if col1 <= col0 or row1 <= row0:
            return None
        window = Window(col0, row0, col1 - col0, row1 - row0)
        data = ds.read(window=window)
        profile = dict(driver="GTiff", dtype=data.dtype.name, count=ds.count, width=window.width,
                       height=window.height, crs=ds.crs, transform=ds.window_transform(window),
                       nodata=ds.nodata, compress="deflate")
        if window.width >= 256 and window.height >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        descriptions = ds.descriptions
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as out:
        out.write(data)
        for i in range(profile["count"]):
            text = description if (description and profile["count"] == 1) else descriptions[i]
            if text:
                out.set_band_description(i + 1, text)
    os.replace(tmp, dest)
    return dest


def _open_stac_client(catalog: str):
    try:
        from pystac_client import Client
    except ImportError as exc:
        raise ImportError("fetch_stac needs pystac-client, which is not installed: `pip install pystac-client` "
                          "(or use fetch_majortom, which needs only huggingface_hub)") from exc
    return Client.open(catalog)


def fetch_stac(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, start: str = "2020-01-01",
               end: str = "2025-12-31", max_cloud: float = 30.0, catalog: str = EARTH_SEARCH,
               collections: Sequence[str] = ("sentinel-2-l2a",), max_items: int = 50, log: Log = print, *,
               client: Any = None, retries: int = 5, backoff: float = 1.0,
               sleep: Callable[[float], Any] = time.sleep) -> Path:
    """Fetch Sentinel-2 L2A bands from a STAC API, clipped to ``bbox``; return ``out_dir/sources.csv``.

    Command (needs internet and ``pip install pystac-client``)::

        python -c "from nycdata.fetch import fetch_stac; fetch_stac('data/raw_stac', start='2021-04-01', end='2021-10-31')"

    Searches ``catalog`` (earth-search v1) for items of ``collections``
    intersecting ``bbox`` from ``start`` to ``end`` with ``eo:cloud_cover <=
    max_cloud`` (at most ``max_items`` items), keeps one item per (MGRS tile,
    date) -- several dates per tile -- and for each of the 12 bands reads the
    bbox window of the COG (``rasterio``, HTTP range reads, native 10/20/60 m
    grid, no resampling) into
    ``<out_dir>/<tile>/S2L2A/<date>_<band>.tif``. parent_id = MGRS tile,
    processing_baseline = ``s2:processing_baseline``, cloud_cover =
    ``eo:cloud_cover``. Files on disk are skipped; the manifest is updated
    after every item. ``client`` replaces ``pystac_client.Client.open(catalog)``.
    """
    out_dir = Path(out_dir)
    bbox = _check_bbox(bbox)
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    if client is None:
        client = _retry(lambda: _open_stac_client(catalog), f"STAC API {catalog}", **retry)

    def search() -> list:
        found = client.search(collections=list(collections), bbox=list(bbox), datetime=f"{start}/{end}",
                              query={"eo:cloud_cover": {"lte": max_cloud}}, max_items=max_items)
        return list(found.items())

    items = _retry(search, f"STAC API {catalog} search", **retry)
    records = select_stac_records((stac_item_record(item) for item in items), max_cloud)
    tiles = sorted({r["parent_id"] for r in records})
    log(f"STAC {catalog}: {len(items)} items -> {len(records)} (tile, date) scenes over tiles {tiles}")
    for n, rec in enumerate(records, 1):
        rows = []
        where = f"[{n}/{len(records)}] S2L2A tile {rec['parent_id']} {rec['date']}"
        missing_bands = [b for b in S2_BANDS if b not in rec["hrefs"]]
        if missing_bands:
            log(f"{where}: item {rec['product_id']} lacks bands {missing_bands}; fetching the others")
        written = 0
        for band in S2_BANDS:
            href = rec["hrefs"].get(band)
            if href is None:
                continue
            rel = f"{rec['parent_id']}/S2L2A/{rec['date']}_{band}.tif"
            if not (out_dir / rel).exists():
                result = _retry(lambda: clip_to_bbox(href, bbox, out_dir / rel, description=band), href, **retry)
                if result is None:
                    log(f"{where}: {band} does not overlap the bbox; skipped")
                    continue
                written += 1
            rows.append(dict(parent_id=rec["parent_id"], modality="S2L2A", date=rec["date"], band=band, path=rel,
                             cloud_cover=rec["cloud_cover"], processing_baseline=rec["processing_baseline"],
                             product_id=rec["product_id"]))
        log(f"{where}: wrote {written}, {len(rows) - written} already there")
        if rows:
            write_manifest(rows, out_dir)
    manifest = out_dir / MANIFEST_NAME
    if not manifest.exists():
        write_manifest([], out_dir)
    return manifest


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


def fetch_worldcover(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, log: Log = print, *,
                     session: Session | None = None, retries: int = 5, backoff: float = 1.0,
                     sleep: Callable[[float], Any] = time.sleep) -> Path:
    """Download the ESA WorldCover 2021 v200 tiles covering ``bbox``; return ``out_dir/sources.csv``.

    Command (needs internet)::

        python -c "from nycdata.fetch import fetch_worldcover; fetch_worldcover('data/raw')"

    Tiles (:func:`worldcover_tiles`; NYC: ``N39W075``) come from the public
    bucket, ``WORLDCOVER_URL``, via :func:`download` (resumable, retried)
    into ``<out_dir>/WORLDCOVER/``. The manifest gets one WORLDCOVER row with
    parent_id ``*``: the label applies to every parent, and the builder clips
    it to each parent's footprint. A bbox spanning several tiles is first
    mosaicked (clipped to ``bbox``) into one file, because the manifest key
    (``*``, WORLDCOVER, "", "") holds exactly one file.
    """
    out_dir = Path(out_dir)
    bbox = _check_bbox(bbox)
    tiles = worldcover_tiles(bbox)
    session = session if session is not None else default_session()
    paths = []
    for n, tile in enumerate(tiles, 1):
        name = f"ESA_WorldCover_10m_2021_v200_{tile}_Map.tif"
        log(f"WorldCover [{n}/{len(tiles)}] tile {tile}")
        paths.append(download(WORLDCOVER_URL.format(tile=tile), out_dir / "WORLDCOVER" / name, session=session,
                              retries=retries, backoff=backoff, sleep=sleep, log=log))
    if len(paths) == 1:
        rel, product = f"WORLDCOVER/{paths[0].name}", f"ESA_WorldCover_10m_2021_v200_{tiles[0]}"
    else:
        tag = "_".join(f"{v:.3f}" for v in bbox).replace("-", "m")
        rel = f"WORLDCOVER/ESA_WorldCover_10m_2021_v200_mosaic_{tag}.tif"
        if not (out_dir / rel).exists():
            log(f"WorldCover: mosaicking {len(paths)} tiles over the bbox into {rel}")
            _mosaic_worldcover(paths, bbox, out_dir / rel)
        product = "ESA_WorldCover_10m_2021_v200_" + "+".join(tiles)
    return write_manifest([dict(parent_id=ALL_PARENTS, modality="WORLDCOVER", date="", band="", path=rel,
                                cloud_cover=None, processing_baseline="", product_id=product)], out_dir)
