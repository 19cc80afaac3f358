"""The default multi-date fetch from Planetary Computer: Sentinel-2 L2A, Sentinel-1 RTC, Copernicus DEM, WorldCover.

What it fetches, for every parent cell of a fixed grid over the NYC bbox
(``parent_px`` x ``parent_px`` pixels of 10 m in UTM 18N, EPSG:32618, corners
on multiples of the cell size; default 1024 px = 4 x 4 chips of 256):

* ``timesteps`` distinct Sentinel-2 L2A days (collection ``sentinel-2-l2a``)
  spread over the season: the season ``[start, end]`` is split into
  ``timesteps`` equal windows and each window gives its least cloudy day whose
  scenes (``eo:cloud_cover <= max_cloud``) together cover the parent; an empty
  window takes the least cloudy day left over. Written as one stacked uint16
  GeoTIFF of the 12 bands in :data:`S2L2A_BANDS` order, DNs as delivered (PC keeps
  the +1000 offset of processing baseline >= 04.00; the manifest records the
  baseline and the builder harmonises);
* for every S2 day the nearest Sentinel-1 RTC day (``sentinel-1-rtc``; VV, VH
  gamma0 in linear power) covering the parent within ``s1_max_days``, distinct
  across the parent's timesteps;
* Copernicus DEM GLO-30 (``cop-dem-glo-30``, bilinear) and ESA WorldCover 2021
  v200 (``esa-worldcover``, nearest), both on the parent's grid.

A parent without enough such days is dropped, and the plan says why. Searching
uses ``pystac-client``; pixels are put on each parent's grid by
``odc.stac.load`` (several tiles of one day are mosaicked there), then written
with rasterio. Layout under OUT::

    OUT/sources.csv
    OUT/<parent>/S2L2A/<date>.tif        12 bands, uint16, nodata 0
    OUT/<parent>/S1RTC/<date>.tif        VV, VH, float32 linear power, nodata NaN
    OUT/<parent>/DEM/DEM.tif             float32 metres
    OUT/<parent>/WORLDCOVER/WORLDCOVER.tif  uint8 ESA classes, nodata 0

Commands (need internet; Planetary Computer needs no key: asset URLs are signed
with the anonymous SAS tokens of the ``planetary-computer`` package)::

    python -m nycdata fetch stac data/sources --dry-run   # search only: the files, dates, clouds and sizes
    python -m nycdata fetch stac data/sources             # fetch; rerun to resume

Resumable: files already on disk are not loaded again, and ``sources.csv`` is
written (merged) after every parent.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from nycdata.data.chips import NYC_BBOX, PIXEL_SIZE_M, S1RTC_BANDS, S2L2A_BANDS
from nycdata.sources.common import Log, check_bbox, safe_name
from nycdata.sources.http import Transient, is_connection_error, with_retries
from nycdata.sources.manifest import (MANIFEST_FILE, baseline_has_offset, normalise_baseline, parse_processing_baseline,
                                      read_manifest, write_manifest)
from nycdata.sources.plan import PlannedFile, fetched_table, human_bytes, plan_table, raster_bytes

PLANETARY_COMPUTER = "https://planetarycomputer.microsoft.com/api/stac/v1"
SOURCE = "planetary-computer"
UTM_CRS = "EPSG:32618"  # UTM 18N: the zone of New York City
S2_COLLECTION, S1_COLLECTION = "sentinel-2-l2a", "sentinel-1-rtc"
DEM_COLLECTION, WORLDCOVER_COLLECTION = "cop-dem-glo-30", "esa-worldcover"
S1_ASSETS: dict[str, str] = {"VV": "vv", "VH": "vh"}  # manifest band -> PC asset key
DEM_ASSET, WORLDCOVER_ASSET = "data", "map"
WORLDCOVER_YEAR, WORLDCOVER_VERSION = 2021, "2.0.0"  # v200 is the 2021 map; v100 (1.0.0) the 2020 one
SEARCH_PAGE = 1000  # Planetary Computer's largest page
LOAD_THREADS = 8  # COG reads per odc.stac.load running at once; each is one HTTP range request or a few


# --------------------------------------------------------------------------- parent grid

@dataclass(frozen=True)
class Parent:
    """One square cell of the UTM 18N grid: ``px`` x ``px`` pixels of 10 m, lower-left corner (x0, y0) in metres."""

    x0: int
    y0: int
    px: int

    @property
    def id(self) -> str:
        # lower-left corner in whole km: unique because cells are at least 1 km apart (see parent_grid)
        return safe_name(f"E{self.x0 // 1000:04d}N{self.y0 // 1000:04d}", "parent id")

    def geobox(self):
        from affine import Affine
        from odc.geo.geobox import GeoBox

        top = self.y0 + self.px * PIXEL_SIZE_M
        return GeoBox((self.px, self.px), Affine(PIXEL_SIZE_M, 0, self.x0, 0, -PIXEL_SIZE_M, top), UTM_CRS)

    @cached_property
    def footprint(self):
        """The cell in lon/lat (a shapely polygon), densified so it follows the projected edges."""
        return self.geobox().extent.to_crs("EPSG:4326", resolution=self.px * PIXEL_SIZE_M / 16).geom

    @property
    def centre_lon(self) -> float:
        return self.footprint.centroid.x


def parent_grid(bbox: Sequence[float] = NYC_BBOX, parent_px: int = 1024) -> list[Parent]:
    """Every parent cell that intersects lon/lat ``bbox``, sorted by id."""
    from odc.geo.geom import box

    if parent_px % 16 or parent_px * PIXEL_SIZE_M < 1000:
        raise ValueError(f"parent_px={parent_px}: must be a multiple of 16 (GeoTIFF tiles) and at least 100 "
                         "(cells of >= 1 km keep the km-based parent ids unique)")
    area = box(*check_bbox(bbox), "EPSG:4326").to_crs(UTM_CRS, resolution=0.01).geom
    size = parent_px * PIXEL_SIZE_M
    x_min, y_min, x_max, y_max = area.bounds
    cells = [Parent(ix * size, iy * size, parent_px)
             for ix in range(math.floor(x_min / size), math.ceil(x_max / size))
             for iy in range(math.floor(y_min / size), math.ceil(y_max / size))]
    return sorted((c for c in cells if c.geobox().extent.geom.intersects(area)), key=lambda c: c.id)


# --------------------------------------------------------------------------- choosing days (pure)

def _ordinal(day: str) -> int:
    return dt.date.fromisoformat(day).toordinal()


def choose_s2_days(clouds: Mapping[str, float], start: str, end: str, timesteps: int) -> list[str]:
    """``timesteps`` distinct days spread over [start, end] (sorted), or [] when fewer days exist.

    [start, end] is split into ``timesteps`` equal windows; each takes its least
    cloudy day (ties: the earlier); an empty window takes the least cloudy day
    not yet taken, wherever it lies.
    """
    if len(clouds) < timesteps:
        return []
    rank = lambda day: (clouds[day], day)  # noqa: E731
    edges = np.linspace(_ordinal(start), _ordinal(end) + 1, timesteps + 1)
    picks = [min((d for d in clouds if lo <= _ordinal(d) < hi), key=rank, default=None)
             for lo, hi in zip(edges[:-1], edges[1:])]
    spare = sorted(set(clouds) - set(picks), key=rank)
    return sorted(p if p is not None else spare.pop(0) for p in picks)


def _window(day: str, start: str, end: str, timesteps: int) -> int:
    """1-based season window of ``day`` (as in :func:`choose_s2_days`)."""
    span = _ordinal(end) + 1 - _ordinal(start)
    return min(timesteps, int((_ordinal(day) - _ordinal(start)) * timesteps / span) + 1)


def match_s1_days(s2_days: Sequence[str], s1_days: Iterable[str], max_days: int) -> dict[str, str]:
    """For each S2 day the nearest S1 day at most ``max_days`` away, distinct across S2 days.

    Greedy over all (S2, S1) pairs by increasing gap; an S2 day left without one is absent from the result.
    """
    pairs = sorted((abs(_ordinal(a) - _ordinal(d)), d, a) for d in s2_days for a in set(s1_days))
    chosen: dict[str, str] = {}
    for gap, day, s1 in pairs:
        if gap <= max_days and day not in chosen and s1 not in chosen.values():
            chosen[day] = s1
    return chosen


# --------------------------------------------------------------------------- item helpers

def _item_time(item) -> dt.datetime:
    stamp = item.datetime or item.common_metadata.start_datetime
    if stamp is None:
        raise ValueError(f"STAC item {item.id!r} has neither datetime nor start_datetime")
    return stamp


def _solar_day(item, lon: float) -> str:
    # the same day odc.stac.load(groupby="solar_day") gives with a geobox: UTC shifted by whole hours of the
    # geobox centre's longitude, so each day loaded here is exactly one time slice there
    return (_item_time(item) + dt.timedelta(hours=int(lon / 15))).date().isoformat()


def _footprint(item):
    from shapely.geometry import shape

    return shape(item.geometry)


def _covers(items: Sequence, area) -> bool:
    from shapely import union_all

    return bool(items) and union_all([_footprint(i) for i in items]).buffer(1e-9).covers(area)


def _check_assets(item, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in item.assets]
    if missing:
        raise ValueError(f"STAC item {item.id!r} ({item.collection_id}) lacks asset(s) {missing}; it has "
                         f"{sorted(item.assets)}. The collection's asset names changed: update nycdata/sources/stac.py")


def _cloud(item) -> float:
    value = item.properties.get("eo:cloud_cover")
    return math.inf if value is None else float(value)


def _s2_product(item) -> str:
    return str(item.properties.get("s2:product_uri") or "").removesuffix(".SAFE") or item.id


def _s2_baseline(item) -> str:
    return (normalise_baseline(item.properties.get("s2:processing_baseline"))
            or parse_processing_baseline(_s2_product(item)) or parse_processing_baseline(item.id))


def _offset_kind(baseline: str) -> str:
    return "unknown" if not baseline else "offset" if baseline_has_offset(baseline) else "no offset"


def _resign(url: str) -> str:
    """A freshly signed URL for Azure blob hrefs: SAS tokens from the search expire (about an hour) long
    before a full fetch ends; planetary_computer caches and renews the token. Other URLs stay as they are."""
    import planetary_computer

    parts = urlsplit(url)
    if not parts.netloc.endswith(".blob.core.windows.net"):
        return url
    return planetary_computer.sign_url(urlunsplit(parts._replace(query="")))


# --------------------------------------------------------------------------- the plan

@dataclass
class Scene:
    """One file the fetch writes: which items go onto which parent's grid, and what the manifest says of it."""

    parent: Parent
    modality: str
    date: str
    items: list
    cloud_cover: float | None = None
    processing_baseline: str = ""
    note: str = ""
    product_id: str = field(init=False, default="")

    def __post_init__(self):
        names = sorted({_s2_product(i) for i in self.items} if self.modality == "S2L2A" else {i.id for i in self.items})
        self.product_id = "+".join(names)

    @property
    def rel(self) -> str:
        name = f"{self.date}.tif" if self.date else f"{self.modality}.tif"
        return f"{self.parent.id}/{self.modality}/{name}"

    def planned(self) -> PlannedFile:
        bands, dtype_bytes = FORMATS[self.modality][:2]
        return PlannedFile(SOURCE, self.parent.id, self.modality, self.date, self.product_id, self.cloud_cover,
                           raster_bytes(self.parent.px, self.parent.px, len(bands), dtype_bytes), self.note)

    def manifest_row(self) -> dict[str, Any]:
        return dict(parent_id=self.parent.id, modality=self.modality, date=self.date, band="", path=self.rel,
                    cloud_cover=self.cloud_cover, processing_baseline=self.processing_baseline,
                    product_id=self.product_id)


@dataclass
class _Search:
    """What the four searches found, over the whole bbox."""

    s2: list
    s1: list
    dem: list
    worldcover: list


def _open_client(catalog: str):
    try:
        import planetary_computer
        from pystac_client import Client
    except ImportError as exc:
        raise ImportError("the Planetary Computer fetch needs pystac-client, planetary-computer and odc-stac: "
                          "`pip install pystac-client planetary-computer odc-stac`") from exc
    # sign_inplace rewrites Azure blob hrefs of every returned item to signed URLs; other hrefs are left alone
    return Client.open(catalog, modifier=planetary_computer.sign_inplace)


def _api_call(fn: Callable[[], Any]) -> Any:
    """``fn()``, with pystac-client's catch-all APIError told apart for with_retries: a connection failure or an HTTP
    5xx / 429 is worth retrying, anything else (a 4xx, a bad answer) is not."""
    try:
        from pystac_client.exceptions import APIError
    except ImportError:  # _open_client says how to install it
        return fn()
    try:
        return fn()
    except APIError as err:
        status = getattr(err, "status_code", None)
        if status is not None and (status == 429 or status >= 500):
            raise Transient("server", f"HTTP {status}: {str(err)[:200]}") from err
        if status is None and err.__context__ is not None and is_connection_error(err.__context__):
            raise Transient("connection", f"{type(err.__context__).__name__}: {err.__context__}") from err
        raise


def _search(client, collection: str, bbox, retry: dict, **kw) -> list:
    def run() -> list:
        return list(client.search(collections=[collection], bbox=list(bbox), limit=SEARCH_PAGE, **kw).items())

    return with_retries(lambda: _api_call(run), f"Planetary Computer search of {collection}", **retry)


def _search_all(client, bbox, start: str, end: str, max_cloud: float, s1_max_days: int, retry: dict,
                log: Log) -> _Search:
    s1_start = (dt.date.fromisoformat(start) - dt.timedelta(days=s1_max_days)).isoformat()
    s1_end = (dt.date.fromisoformat(end) + dt.timedelta(days=s1_max_days)).isoformat()
    s2 = [i for i in _search(client, S2_COLLECTION, bbox, retry, datetime=f"{start}/{end}",
                             query={"eo:cloud_cover": {"lte": max_cloud}}) if _cloud(i) <= max_cloud]
    # PC also holds single-polarisation (VV or VH only) and HH/HV scenes: only VV+VH ones give both bands
    s1 = [i for i in _search(client, S1_COLLECTION, bbox, retry, datetime=f"{s1_start}/{s1_end}")
          if set(S1RTC_BANDS) <= set(i.properties.get("sar:polarizations") or ())]
    dem = _search(client, DEM_COLLECTION, bbox, retry)
    worldcover = [i for i in _search(client, WORLDCOVER_COLLECTION, bbox, retry,
                                     datetime=f"{WORLDCOVER_YEAR}-01-01/{WORLDCOVER_YEAR}-12-31")
                  if i.properties.get("esa_worldcover:product_version") == WORLDCOVER_VERSION]
    log(f"Planetary Computer: {len(s2)} S2 L2A items (cloud <= {max_cloud:g} %), {len(s1)} S1 RTC (VV+VH), "
        f"{len(dem)} DEM, {len(worldcover)} WorldCover {WORLDCOVER_YEAR} items over {list(bbox)}")
    found = _Search(s2, s1, dem, worldcover)
    _check_all_assets(found)
    return found


def _check_all_assets(found: _Search) -> None:
    """Fail before any pixel is read if PC renamed an asset the fetch loads."""
    for items, keys in ((found.s2, S2L2A_BANDS), (found.s1, S1_ASSETS.values()), (found.dem, [DEM_ASSET]),
                        (found.worldcover, [WORLDCOVER_ASSET])):
        for item in items:
            _check_assets(item, keys)


def _by_day(items: Iterable, parent: Parent, key: Callable = lambda item: "") -> dict[tuple[str, str], list]:
    """Items that touch the parent, grouped by (solar day, ``key(item)``)."""
    area, lon = parent.footprint, parent.centre_lon
    groups: dict[tuple[str, str], list] = {}
    for item in items:
        if _footprint(item).intersects(area):
            groups.setdefault((_solar_day(item, lon), key(item)), []).append(item)
    return groups


def _s2_days(parent: Parent, items: Sequence) -> dict[str, list]:
    """Days whose scenes cover the parent and agree on the +1000 offset (a mosaic must be one radiometry)."""
    area = parent.footprint
    return {day: group for (day, _), group in sorted(_by_day(items, parent).items())
            if _covers(group, area) and len({_offset_kind(_s2_baseline(i)) for i in group}) == 1}


def _s1_days(parent: Parent, items: Sequence) -> dict[str, list]:
    """Per day, the first orbit direction whose slices cover the parent (never two geometries in one image)."""
    area, days = parent.footprint, {}
    orbit = lambda item: str(item.properties.get("sat:orbit_state") or "")  # noqa: E731
    for (day, _), group in sorted(_by_day(items, parent, orbit).items()):
        if day not in days and _covers(group, area):
            days[day] = group
    return days


def _gap_note(s2_day: str, s1_day: str, group: Sequence) -> str:
    gap = _ordinal(s1_day) - _ordinal(s2_day)
    when = "same day as" if gap == 0 else f"{abs(gap)} d {'after' if gap > 0 else 'before'}"
    orbit = group[0].properties.get("sat:orbit_state") or "orbit ?"
    return f"S1 {when} S2 {s2_day}, {orbit}"


def _plan_parent(parent: Parent, found: _Search, start: str, end: str, timesteps: int, max_cloud: float,
                 s1_max_days: int) -> tuple[list[Scene], str]:
    """The parent's scenes, or ([], why it is dropped)."""
    s2 = _s2_days(parent, found.s2)
    clouds = {day: float(np.mean([_cloud(i) for i in group])) for day, group in s2.items()}
    days = choose_s2_days(clouds, start, end, timesteps)
    if not days:
        return [], (f"{len(s2)} S2 days with cloud <= {max_cloud:g} % cover it ({', '.join(sorted(s2)) or 'none'}), "
                    f"{timesteps} needed")
    s1 = _s1_days(parent, found.s1)
    pairs = match_s1_days(days, s1, s1_max_days)
    if len(pairs) < len(days):
        lonely = [d for d in days if d not in pairs]
        return [], (f"no distinct S1 RTC day covering it within {s1_max_days} d of S2 {', '.join(lonely)} "
                    f"(S1 days covering it: {', '.join(sorted(s1)) or 'none'})")
    worldcover = [i for i in found.worldcover if _footprint(i).intersects(parent.footprint)]
    if not worldcover:
        return [], f"no ESA WorldCover {WORLDCOVER_YEAR} v200 item touches it"
    dem = [i for i in found.dem if _footprint(i).intersects(parent.footprint)]
    scenes = [Scene(parent, "S2L2A", d, s2[d], clouds[d], _s2_baseline(s2[d][0]),
                    f"window {_window(d, start, end, timesteps)}/{timesteps}, {len(s2[d])} tile(s), "
                    f"baseline {_s2_baseline(s2[d][0]) or '?'}") for d in days]
    scenes += [Scene(parent, "S1RTC", pairs[d], s1[pairs[d]], note=_gap_note(d, pairs[d], s1[pairs[d]])) for d in days]
    scenes.append(Scene(parent, "DEM", "", dem, note="GLO-30, bilinear" if dem else "no GLO-30 tile (ocean): zeros"))
    scenes.append(Scene(parent, "WORLDCOVER", "", worldcover, note=f"{WORLDCOVER_YEAR} v200, nearest"))
    return scenes, ""


def _plan(client, bbox, start, end, timesteps, max_cloud, parent_px, s1_max_days, max_parents, retry, log
          ) -> tuple[list[Scene], list[str]]:
    if timesteps < 1:
        raise ValueError(f"timesteps={timesteps}: need at least 1")
    bbox = check_bbox(bbox)
    found = _search_all(client, bbox, start, end, max_cloud, s1_max_days, retry, log)
    scenes, dropped, kept = [], [], 0
    parents = parent_grid(bbox, parent_px)
    for parent in parents:
        if max_parents is not None and kept >= max_parents:
            break
        planned, why = _plan_parent(parent, found, start, end, timesteps, max_cloud, s1_max_days)
        if why:
            dropped.append(f"{parent.id}: {why}")
            log(f"dropped parent {parent.id}: {why}")
            continue
        scenes += planned
        kept += 1
    log(f"{kept} of {len(parents)} parent cells ({parent_px} px = {parent_px * PIXEL_SIZE_M / 1000:g} km) kept"
        + (f" (max_parents={max_parents})" if max_parents is not None else "") + f", {len(dropped)} dropped")
    return scenes, dropped


# --------------------------------------------------------------------------- loading and writing

# modality -> (bands, bytes per value, dtype, nodata written, odc.stac.load keywords)
FORMATS: dict[str, tuple] = {
    "S2L2A": (S2L2A_BANDS, 2, "uint16", 0, dict(bands=list(S2L2A_BANDS), dtype="uint16", nodata=0, resampling="bilinear")),
    "S1RTC": (S1RTC_BANDS, 4, "float32", float("nan"),
              dict(bands=list(S1_ASSETS.values()), dtype="float32", resampling="bilinear")),
    "DEM": (("DEM",), 4, "float32", None, dict(bands=[DEM_ASSET], dtype="float32", nodata=float("nan"),
                                                resampling="bilinear")),
    "WORLDCOVER": (("WORLDCOVER",), 1, "uint8", 0, dict(bands=[WORLDCOVER_ASSET], dtype="uint8", nodata=0,
                                                        resampling="nearest")),
}


def _load(scene: Scene, retry: dict) -> np.ndarray:
    """(bands, H, W) of the scene's items on the parent's grid, through odc.stac.load."""
    import odc.stac
    from rasterio.errors import NotGeoreferencedWarning

    keywords = FORMATS[scene.modality][4]
    if not scene.items:  # DEM over open sea: GLO-30 has no tile there; Copernicus documents the height as 0
        return np.zeros((1, scene.parent.px, scene.parent.px), "float32")

    def load():
        with warnings.catch_warnings():
            # rasterio warns while odc-loader sets up its in-memory destination, before the geobox is attached
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return odc.stac.load(scene.items, geobox=scene.parent.geobox(), groupby="solar_day", patch_url=_resign,
                                 pool=LOAD_THREADS, **keywords)

    data = with_retries(load, f"{scene.parent.id} {scene.modality} {scene.date} ({scene.product_id})", **retry)
    if data.sizes.get("time", 1) != 1:
        raise RuntimeError(f"{scene.parent.id} {scene.modality} {scene.date}: odc.stac grouped the items into "
                           f"{data.sizes['time']} solar days, expected 1")
    planes = []
    for band in keywords["bands"]:
        values = data[band].values.reshape(scene.parent.px, scene.parent.px)
        nodata = data[band].attrs.get("nodata")
        if scene.modality == "S1RTC" and nodata is not None and not np.isnan(nodata):
            values = np.where(values == nodata, np.nan, values)  # PC RTC marks nodata -32768; the builder wants NaN
        planes.append(values)
    return np.stack(planes)


def _fill_dem(values: np.ndarray, scene: Scene, log: Log) -> np.ndarray:
    missing = np.isnan(values)
    if missing.any():
        log(f"  {scene.parent.id} DEM: {missing.mean():.1%} of the cell has no GLO-30 tile (open sea); "
            "height 0 there, as Copernicus documents")
    return np.where(missing, 0.0, values).astype("float32")


def write_geotiff(path: Path, array: np.ndarray, geobox, dtype: str, nodata, descriptions: Sequence[str]) -> int:
    """Write (bands, H, W) on ``geobox`` as a tiled deflate GeoTIFF via a temporary file; return its size."""
    import rasterio

    bands, height, width = array.shape
    block = 256 if min(height, width) >= 256 else min(height, width)
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype=dtype, crs=str(geobox.crs),
                   transform=geobox.transform, nodata=nodata, compress="deflate", tiled=True,
                   blockxsize=block, blockysize=block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array.astype(dtype))
        for i, text in enumerate(descriptions, start=1):
            dst.set_band_description(i, text)
    os.replace(tmp, path)
    return path.stat().st_size


def _fetch_scene(scene: Scene, out_dir: Path, retry: dict, log: Log) -> int:
    values = _load(scene, retry)
    if scene.modality == "DEM":
        values = _fill_dem(values, scene, log)
    bands, _, dtype, nodata, _ = FORMATS[scene.modality]
    return write_geotiff(out_dir / scene.rel, values, scene.parent.geobox(), dtype, nodata, bands)


# --------------------------------------------------------------------------- entry points

def plan_stac(bbox: Sequence[float] = NYC_BBOX, start: str = "2021-04-01", end: str = "2021-10-31",
              timesteps: int = 4, max_cloud: float = 30.0, parent_px: int = 1024, s1_max_days: int = 12,
              catalog: str = PLANETARY_COMPUTER, max_parents: int | None = None, log: Log = print, *,
              retries: int = 5, backoff: float = 1.0, sleep: Callable[[float], Any] = time.sleep
              ) -> tuple[list[PlannedFile], list[str]]:
    """The files :func:`fetch_stac` would write and the parents it would drop (with why); searches only."""
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    client = with_retries(lambda: _api_call(lambda: _open_client(catalog)), f"STAC API {catalog}", **retry)
    scenes, dropped = _plan(client, bbox, start, end, timesteps, max_cloud, parent_px, s1_max_days, max_parents,
                            retry, log)
    return [s.planned() for s in scenes], dropped


def fetch_stac(out_dir: str | Path, bbox: Sequence[float] = NYC_BBOX, start: str = "2021-04-01",
               end: str = "2021-10-31", timesteps: int = 4, max_cloud: float = 30.0, parent_px: int = 1024,
               s1_max_days: int = 12, catalog: str = PLANETARY_COMPUTER, max_parents: int | None = None,
               dry_run: bool = False, log: Log = print, *, retries: int = 5, backoff: float = 1.0,
               sleep: Callable[[float], Any] = time.sleep) -> Path | list[PlannedFile]:
    """Fetch every parent's S2 / S1 days, DEM and WorldCover into ``out_dir``; return ``out_dir/sources.csv``.

    ``dry_run``: search, log the plan (files, dates, products, cloud, sizes, dropped parents) and return it as
    :class:`PlannedFile` rows; nothing is written, not even ``out_dir``. See the module docstring.
    """
    retry = dict(retries=retries, backoff=backoff, sleep=sleep, log=log)
    client = with_retries(lambda: _api_call(lambda: _open_client(catalog)), f"STAC API {catalog}", **retry)
    scenes, dropped = _plan(client, bbox, start, end, timesteps, max_cloud, parent_px, s1_max_days, max_parents,
                            retry, log)
    if dry_run:
        plan = [s.planned() for s in scenes]
        log(plan_table(plan))
        for why in dropped:
            log(f"dropped {why}")
        return plan
    out_dir = Path(out_dir)
    _fetch_all(scenes, out_dir, retry, log)
    for why in dropped:
        log(f"dropped {why}")
    log(fetched_table(read_manifest(out_dir), out_dir))
    return out_dir / MANIFEST_FILE


def _fetch_all(scenes: Sequence[Scene], out_dir: Path, retry: dict, log: Log) -> None:
    rows: list[dict] = []
    for k, scene in enumerate(scenes, 1):
        where = f"[{k}/{len(scenes)}] {scene.parent.id} {scene.modality}" + (f" {scene.date}" if scene.date else "")
        if (out_dir / scene.rel).is_file():
            log(f"{where}: already there")
        else:
            log(f"{where}: wrote {human_bytes(_fetch_scene(scene, out_dir, retry, log))}")
        rows.append(scene.manifest_row())
        if k == len(scenes) or scenes[k].parent != scene.parent:
            write_manifest(rows, out_dir)  # after every parent, so an interrupted fetch keeps what it got
            rows = []
    if not scenes:
        write_manifest([], out_dir)
