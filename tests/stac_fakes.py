"""A fake Planetary Computer STAC API on 127.0.0.1, with items in PC's real schemas and small GeoTIFFs behind them.

The server speaks enough of the STAC API for the real pystac-client (landing
page with ``conformsTo``, ``/conformance``, ``/collections/<id>``, ``/search``
by GET and POST with ``collections``, ``bbox``, ``datetime``, ``query``,
``limit`` and ``next`` links), and the hrefs point at COGs on the same server
that GDAL reads by HTTP ranges, as odc-stac does against Azure.

Where each item's schema comes from (property and asset names as PC serves them):

* sentinel-2-l2a: a PC item kept as odc-stac's test data,
  ``opendatacube/odc-stac tests/data/S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531.json``
  (``s2:processing_baseline``, ``s2:product_uri``, ``s2:mgrs_tile``, ``eo:cloud_cover``,
  ``proj:epsg`` on the item, ``proj:shape``/``proj:transform``/``proj:bbox`` and ``gsd`` per asset,
  asset keys ``B01``..``B12``, ``B8A``, ``SCL``...), and the collection's ``item_assets`` in
  ``microsoft/planetary-computer-tasks datasets/sentinel-2/collection/template.json``;
* sentinel-1-rtc: ``microsoft/planetary-computer-tasks datasets/sentinel-1-rtc/collection/template.json``
  (assets ``vv``/``vh``, ``raster:bands`` float32, nodata -32768), ``datasets/sentinel-1-rtc/s1rtc.py``
  (renames the source's ``vv-rtc`` to ``vv``) and the source item
  ``pctasks/core/tests/data-files/items/s1-rtc/2019/12/15/IW/DV/S1A_IW_GRDH_1SDV_20191215T003835_..._rtc.json``
  (``sar:*``, ``sat:orbit_state``, ``s1:*``, item-level ``proj:epsg``/``proj:shape``/``proj:bbox`` and a
  9-element ``proj:transform``);
* cop-dem-glo-30: ``stactools-packages/cop-dem``
  ``examples/cop-dem-glo-30/Copernicus_DSM_COG_10_N53_00_W115_00_DEM/Copernicus_DSM_COG_10_N53_00_W115_00_DEM.json``
  (asset ``data``, item-level ``proj:epsg`` 4326, ``proj:transform`` with the half-pixel shift, ``datetime``
  2021-04-22) and PC's collection template ``datasets/cop-dem/collection/cop-dem-glo-30/template.json``;
* esa-worldcover: ``stactools-packages/esa-worldcover examples/ESA_WorldCover_10m_2021_v200_N00E006/...json``
  (``esa_worldcover:product_version`` "2.0.0", ``datetime`` null with ``start_datetime``/``end_datetime``,
  asset ``map`` uint8 nodata 0 with per-asset ``proj:transform``/``proj:shape``) and PC's collection template
  ``datasets/esa-worldcover/collection/template.json``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode

import numpy as np

from local_http import LocalServer

API_ROOT = "/api/stac/v1"
CONFORMS_TO = [  # as PC's landing page lists them
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
    "https://api.stacspec.org/v1.0.0-rc.1/core",
    "https://api.stacspec.org/v1.0.0-rc.1/collections",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search#query",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search#sort",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search#fields",
    "https://api.stacspec.org/v1.0.0-rc.1/ogcapi-features",
]
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
S2_ASSET_GSD = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
                "B8A": 20, "B09": 60, "B11": 20, "B12": 20}
S2_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def geotiff_bytes(array: np.ndarray, crs: str, transform, nodata=None) -> bytes:
    """A (bands, H, W) array as a cloud-optimized GeoTIFF, in memory."""
    from rasterio.io import MemoryFile

    bands, height, width = array.shape
    with MemoryFile() as mem:
        with mem.open(driver="COG", width=width, height=height, count=bands, dtype=array.dtype.name, crs=crs,
                      transform=transform, nodata=nodata, compress="deflate", blocksize=256) as dst:
            dst.write(array)
        return bytes(mem.read())


def _lonlat_polygon(bounds, crs: str) -> dict:
    from odc.geo.geom import box

    poly = box(*bounds, crs).to_crs("EPSG:4326", resolution=(bounds[2] - bounds[0]) / 32).geom
    return {"type": "Polygon", "coordinates": [[list(xy) for xy in poly.exterior.coords]]}


def _bbox_of(geometry: dict) -> list[float]:
    xs, ys = zip(*geometry["coordinates"][0])
    return [min(xs), min(ys), max(xs), max(ys)]


# --------------------------------------------------------------------------- the API

@dataclass
class FakeStacApi:
    """Routes of a STAC API under ``API_ROOT`` on ``server``; add items with :meth:`add`."""

    server: LocalServer
    items: list[dict] = field(default_factory=list)
    max_page: int = 5  # servers cap ``limit``; a small cap makes pystac-client follow ``next`` links

    def __post_init__(self):
        self.server.route(API_ROOT + "/?", self._landing)
        self.server.route(API_ROOT + "/conformance", lambda *a: self.server.json(200, {"conformsTo": CONFORMS_TO}))
        self.server.route(API_ROOT + "/collections/[^/]+", self._collection)
        self.server.route(API_ROOT + "/search", self._search)

    @property
    def url(self) -> str:
        return self.server.base_url + API_ROOT

    def add(self, item: dict) -> None:
        self.items.append(item)

    def _landing(self, method, path, query, body):
        root = self.url + "/"
        links = [{"rel": "self", "type": "application/json", "href": root},
                 {"rel": "root", "type": "application/json", "href": root},
                 {"rel": "data", "type": "application/json", "href": self.url + "/collections"},
                 {"rel": "conformance", "type": "application/json", "href": self.url + "/conformance"},
                 {"rel": "search", "type": "application/geo+json", "href": self.url + "/search", "method": "GET"},
                 {"rel": "search", "type": "application/geo+json", "href": self.url + "/search", "method": "POST"}]
        return self.server.json(200, {"type": "Catalog", "id": "microsoft-pc", "stac_version": "1.0.0",
                                      "title": "Microsoft Planetary Computer STAC API (fake)",
                                      "description": "test double", "conformsTo": CONFORMS_TO, "links": links})

    def _collection(self, method, path, query, body):
        cid = path.rsplit("/", 1)[-1]
        return self.server.json(200, {"type": "Collection", "id": cid, "stac_version": "1.0.0", "description": cid,
                                      "license": "proprietary", "links": [],
                                      "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                                 "temporal": {"interval": [[None, None]]}}})

    def _search(self, method, path, query, body):
        params = json.loads(body) if method == "POST" and body else _get_params(query)
        matched = sorted((i for i in self.items if _matches(i, params)), key=lambda i: (_interval(i)[0], i["id"]))
        offset = int(str(params.get("token") or "next:0").split(":")[1])
        limit = min(int(params.get("limit") or 10), self.max_page)
        links = [{"rel": "root", "type": "application/json", "href": self.url + "/"}]
        if offset + limit < len(matched):
            follow = {**params, "token": f"next:{offset + limit}"}
            if method == "POST":
                links.append({"rel": "next", "type": "application/geo+json", "href": self.url + "/search",
                              "method": "POST", "body": follow, "merge": False})
            else:
                flat = {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else
                            ",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in follow.items()}
                links.append({"rel": "next", "type": "application/geo+json",
                              "href": self.url + "/search?" + urlencode(flat), "method": "GET"})
        page = matched[offset:offset + limit]
        return self.server.json(200, {"type": "FeatureCollection", "features": page, "links": links,
                                      "numberMatched": len(matched), "numberReturned": len(page)})


def _get_params(query: dict) -> dict:
    params = dict(query)
    for key in ("collections", "bbox"):
        if isinstance(params.get(key), str):
            params[key] = params[key].split(",")
    if isinstance(params.get("query"), str):
        params["query"] = json.loads(params["query"])
    return params


def _stamp(text: str | None, default: dt.datetime) -> dt.datetime:
    if text in (None, "", ".."):
        return default
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _interval(item: dict) -> tuple[dt.datetime, dt.datetime]:
    props = item["properties"]
    low, high = dt.datetime.min.replace(tzinfo=dt.timezone.utc), dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    if props.get("datetime"):
        moment = _stamp(props["datetime"], low)
        return moment, moment
    return _stamp(props.get("start_datetime"), low), _stamp(props.get("end_datetime"), high)


_OPS = {"lte": lambda a, b: a <= b, "lt": lambda a, b: a < b, "gte": lambda a, b: a >= b,
        "gt": lambda a, b: a > b, "eq": lambda a, b: a == b}


def _matches(item: dict, params: dict) -> bool:
    if params.get("collections") and item["collection"] not in params["collections"]:
        return False
    if params.get("bbox"):
        x0, y0, x1, y1 = map(float, params["bbox"])
        a0, b0, a1, b1 = item["bbox"]
        if a0 > x1 or a1 < x0 or b0 > y1 or b1 < y0:
            return False
    if params.get("datetime"):
        low, _, high = str(params["datetime"]).partition("/")
        high = high or low
        start, end = _interval(item)
        floor, ceil = dt.datetime.min.replace(tzinfo=dt.timezone.utc), dt.datetime.max.replace(tzinfo=dt.timezone.utc)
        if end < _stamp(low, floor) or start > _stamp(high, ceil):
            return False
    for prop, tests in (params.get("query") or {}).items():
        value = item["properties"].get(prop)
        if value is None or not all(_OPS[op](value, bound) for op, bound in tests.items()):
            return False
    return True


# --------------------------------------------------------------------------- items in PC's schemas

def _links(collection: str, item_id: str, base: str) -> list[dict]:
    return [{"rel": "collection", "type": "application/json", "href": f"{base}/collections/{collection}"},
            {"rel": "parent", "type": "application/json", "href": f"{base}/collections/{collection}"},
            {"rel": "root", "type": "application/json", "href": f"{base}/"},
            {"rel": "self", "type": "application/geo+json", "href": f"{base}/collections/{collection}/items/{item_id}"}]


def _feature(collection: str, item_id: str, properties: dict, geometry: dict, assets: dict, base: str,
             extensions: list[str]) -> dict:
    return {"type": "Feature", "stac_version": "1.0.0", "stac_extensions": extensions, "id": item_id,
            "collection": collection, "properties": properties, "geometry": geometry, "bbox": _bbox_of(geometry),
            "links": _links(collection, item_id, base), "assets": assets}


@dataclass(frozen=True)
class S2Tile:
    """One Sentinel-2 L2A scene: a tile's data rectangle in UTM 18N (multiples of 60 m) on one day."""

    when: str  # ISO datetime, UTC
    mgrs: str  # e.g. "18TWL"
    bounds: tuple[int, int, int, int]  # x0, y0, x1, y1 in EPSG:32618, the footprint and the raster extent
    cloud: float
    baseline: str = "03.00"


def add_s2_item(api: FakeStacApi, tile: S2Tile, values: dict[str, int], rename: dict[str, str] | None = None) -> dict:
    """Serve the 12 used bands of ``tile`` (band b holds the constant ``values[b]``) and its PC item."""
    from affine import Affine

    stamp = dt.datetime.fromisoformat(tile.when.replace("Z", "+00:00"))
    sensing = stamp.strftime("%Y%m%dT%H%M%S")
    processed = (stamp + dt.timedelta(hours=5)).strftime("%Y%m%dT%H%M%S")
    baseline_code = "N" + tile.baseline.replace(".", "")
    product = f"S2B_MSIL2A_{sensing}_{baseline_code}_R011_T{tile.mgrs}_{processed}"
    item_id = f"S2B_MSIL2A_{sensing}_R011_T{tile.mgrs}_{processed}"  # PC's ids drop the baseline token
    x0, y0, x1, y1 = tile.bounds
    assets = {}
    for band in S2_ORDER:
        gsd = S2_ASSET_GSD[band]
        shape = ((y1 - y0) // gsd, (x1 - x0) // gsd)
        transform = Affine(gsd, 0, x0, 0, -gsd, y1)
        data = np.full((1, *shape), values[band], dtype="uint16")
        path = f"/blobs/s2/{product}.SAFE/IMG_DATA/R{gsd}m/T{tile.mgrs}_{sensing}_{band}_{gsd}m.tif"
        href = api.server.add_file(path, geotiff_bytes(data, "EPSG:32618", transform, nodata=0))
        assets[(rename or {}).get(band, band)] = {
            "href": href, "type": COG, "title": f"Band {band.lstrip('B0')} - {gsd}m", "gsd": gsd,
            "eo:bands": [{"name": band}], "proj:bbox": [x0, y0, x1, y1], "proj:shape": list(shape),
            "proj:transform": list(transform)[:6], "roles": ["data"]}
    properties = {
        "datetime": tile.when, "platform": "Sentinel-2B", "proj:epsg": 32618, "instruments": ["msi"],
        "s2:mgrs_tile": tile.mgrs, "constellation": "Sentinel 2", "eo:cloud_cover": tile.cloud,
        "s2:product_uri": f"{product}.SAFE", "s2:product_type": "S2MSI2A", "sat:orbit_state": "descending",
        "sat:relative_orbit": 11, "s2:processing_baseline": tile.baseline, "s2:nodata_pixel_percentage": 0.0,
        "s2:datatake_id": f"GS2B_{sensing}_021700_{baseline_code}"}
    item = _feature("sentinel-2-l2a", item_id, properties, _lonlat_polygon(tile.bounds, "EPSG:32618"), assets,
                    api.url, ["https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                              "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                              "https://stac-extensions.github.io/projection/v1.0.0/schema.json"])
    api.add(item)
    return item


@dataclass(frozen=True)
class S1Slice:
    """One Sentinel-1 RTC slice: its data rectangle in UTM 18N; the raster may extend further, filled with -32768."""

    when: str
    bounds: tuple[int, int, int, int]  # data footprint
    raster: tuple[int, int, int, int]  # raster extent (>= bounds)
    orbit_state: str = "ascending"
    slice_number: int = 1
    polarizations: tuple[str, ...] = ("VV", "VH")


def add_s1_item(api: FakeStacApi, piece: S1Slice, vv: float, vh: float) -> dict:
    from affine import Affine

    stamp = dt.datetime.fromisoformat(piece.when.replace("Z", "+00:00"))
    start, stop = stamp - dt.timedelta(seconds=12), stamp + dt.timedelta(seconds=13)
    mode = "1SDV" if len(piece.polarizations) == 2 else f"1SS{piece.polarizations[0][0]}"
    name = f"S1A_IW_GRDH_{mode}_{start:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}_037000_045A5B"
    rx0, ry0, rx1, ry1 = piece.raster
    transform = Affine(10, 0, rx0, 0, -10, ry1)
    shape = ((ry1 - ry0) // 10, (rx1 - rx0) // 10)
    cols = rx0 + 10 * np.arange(shape[1]) + 5
    rows = ry1 - 10 * np.arange(shape[0]) - 5
    x0, y0, x1, y1 = piece.bounds
    inside = ((cols >= x0) & (cols < x1))[None, :] & ((rows >= y0) & (rows < y1))[:, None]
    assets = {}
    for key, value in [(k, v) for k, v in (("vv", vv), ("vh", vh)) if k.upper() in piece.polarizations]:
        data = np.where(inside, np.float32(value), np.float32(-32768))[None].astype("float32")
        href = api.server.add_file(f"/blobs/s1/GRD/{name}_4B85/measurement/iw-{key}.rtc.tiff",
                                   geotiff_bytes(data, "EPSG:32618", transform, nodata=-32768))
        assets[key] = {"href": href, "type": COG, "roles": ["data"],
                       "title": f"{key.upper()}: vertical transmit, {'vertical' if key == 'vv' else 'horizontal'} "
                                "receive",
                       "raster:bands": [{"nodata": -32768, "data_type": "float32", "spatial_resolution": 10}]}
    properties = {
        "sar:frequency_band": "C", "sar:center_frequency": 5.405, "sar:observation_direction": "right",
        "sar:instrument_mode": "IW", "sar:polarizations": list(piece.polarizations), "sar:product_type": "GRD",
        "sar:resolution_range": 20, "sar:resolution_azimuth": 22, "sar:pixel_spacing_range": 10,
        "sar:pixel_spacing_azimuth": 10, "sar:looks_range": 5, "sar:looks_azimuth": 1,
        "sar:looks_equivalent_number": 4.4, "sat:platform_international_designator": "2014-016A",
        "sat:orbit_state": piece.orbit_state, "sat:absolute_orbit": 37000, "sat:relative_orbit": 106,
        "platform": "SENTINEL-1A", "constellation": "Sentinel-1",
        "start_datetime": str(start), "end_datetime": str(stop),  # PC writes these with a space, as here
        "s1:instrument_configuration_ID": "7", "s1:datatake_id": "285275", "s1:product_timeliness": "Fast-24h",
        "s1:processing_level": "1", "s1:resolution": "high", "s1:orbit_source": "RESORB",
        "s1:slice_number": str(piece.slice_number), "s1:total_slices": "2", "s1:shape": [shape[1], shape[0]],
        "datetime": piece.when, "proj:epsg": 32618, "proj:shape": list(shape), "proj:bbox": list(piece.raster),
        "proj:transform": [*list(transform)[:6], 0.0, 0.0, 1.0]}  # PC's RTC items carry all 9 coefficients
    item = _feature("sentinel-1-rtc", f"{name}_rtc", properties, _lonlat_polygon(piece.bounds, "EPSG:32618"),
                    assets, api.url, ["https://stac-extensions.github.io/sar/v1.0.0/schema.json",
                                      "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                                      "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
                                      "https://stac-extensions.github.io/raster/v1.0.0/schema.json"])
    api.add(item)
    return item


def add_dem_item(api: FakeStacApi, lon0: float, lat0: float, lon1: float, lat1: float, height: float) -> dict:
    """A GLO-30 item over [lon0, lon1] x [lat0, lat1] (1 arc-second grid, half-pixel shifted as PC's) of one height."""
    from affine import Affine

    step = 1 / 3600
    transform = Affine(step, 0, lon0 - step / 2, 0, -step, lat1 + step / 2)
    shape = (round((lat1 - lat0) / step), round((lon1 - lon0) / step))
    tile = f"N{int(lat0):02d}_00_W{int(-np.floor(lon0)):03d}_00"
    item_id = f"Copernicus_DSM_COG_10_{tile}_DEM"
    href = api.server.add_file(f"/blobs/dem/{item_id}.tif",
                               geotiff_bytes(np.full((1, *shape), height, "float32"), "EPSG:4326", transform))
    left, top = lon0 - step / 2, lat1 + step / 2
    geometry = {"type": "Polygon", "coordinates": [[[left + shape[1] * step, top - shape[0] * step],
                                                    [left + shape[1] * step, top], [left, top],
                                                    [left, top - shape[0] * step],
                                                    [left + shape[1] * step, top - shape[0] * step]]]}
    properties = {"platform": "tandem-x", "gsd": 30, "license": "proprietary", "proj:epsg": 4326,
                  "proj:transform": list(transform)[:6], "proj:shape": list(shape),
                  "proj:centroid": {"lat": (lat0 + lat1) / 2, "lon": (lon0 + lon1) / 2},
                  "grid:code": f"CDEM-N{int(lat0):02d}W{int(-np.floor(lon0)):03d}", "datetime": "2021-04-22T00:00:00Z"}
    assets = {"data": {"href": href, "type": COG, "title": "Data", "roles": ["data"],
                       "raster:bands": [{"sampling": "point", "data_type": "float32", "spatial_resolution": 30,
                                         "unit": "meter"}]}}
    item = _feature("cop-dem-glo-30", item_id, properties, geometry, assets, api.url,
                    ["https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                     "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                     "https://stac-extensions.github.io/grid/v1.1.0/schema.json"])
    api.add(item)
    return item


def add_worldcover_item(api: FakeStacApi, year: int, lon0: float, lat0: float, lon1: float, lat1: float,
                        classes: Callable[[np.ndarray], np.ndarray]) -> dict:
    """A WorldCover item (2020 = v100, 2021 = v200) over the box; ``classes(lon)`` gives each column's class."""
    from affine import Affine

    step = 1 / 12000
    version, tag = ("2.0.0", "v200") if year == 2021 else ("1.0.0", "v100")
    tile = "N39W075"  # the real 3 x 3 degree tile holding NYC
    item_id = f"ESA_WorldCover_10m_{year}_{tag}_{tile}"
    transform = Affine(step, 0, lon0, 0, -step, lat1)
    shape = (round((lat1 - lat0) / step), round((lon1 - lon0) / step))
    lons = lon0 + step * (np.arange(shape[1]) + 0.5)
    data = np.broadcast_to(classes(lons).astype("uint8")[None, None, :], (1, *shape)).copy()
    href = api.server.add_file(f"/blobs/worldcover/{tag}/{year}/map/{item_id}_Map.tif",
                               geotiff_bytes(data, "EPSG:4326", transform, nodata=0))
    ring = [[lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0], [lon1, lat0]]
    geometry = {"type": "Polygon", "coordinates": [ring]}
    properties = {"esa_worldcover:product_version": version, "esa_worldcover:product_tile": tile,
                  "start_datetime": f"{year}-01-01T00:00:00Z", "end_datetime": f"{year}-12-31T23:59:59Z",
                  "description": "ESA WorldCover product at 10m resolution", "mission": "sentinel-1, sentinel-2",
                  "platform": "sentinel-1a, sentinel-1b, sentinel-2a, sentinel-2b", "instruments": ["c-sar", "msi"],
                  "proj:epsg": 4326, "grid:code": f"ESAWORLDCOVER-{tile}", "datetime": None}
    assets = {"map": {"href": href, "type": COG, "title": "Land Cover Classes", "roles": ["data"],
                      "raster:bands": [{"name": "Band1", "description": "Classification values", "nodata": 0,
                                        "sampling": "area", "data_type": "uint8", "spatial_resolution": 10}],
                      "classification:classes": [{"value": 10, "description": "Tree cover"},
                                                 {"value": 50, "description": "Built-up"},
                                                 {"value": 80, "description": "Permanent water bodies"}],
                      "proj:transform": list(transform)[:6], "proj:shape": list(shape)}}
    item = _feature("esa-worldcover", item_id, properties, geometry, assets, api.url,
                    ["https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                     "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
                     "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                     "https://stac-extensions.github.io/classification/v1.0.0/schema.json"])
    api.add(item)
    return item
