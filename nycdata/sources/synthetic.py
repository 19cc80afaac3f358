"""Synthetic *raw source files* plus their ``sources.csv`` manifest, for testing the builder offline.

:mod:`nycdata.data.fixture` writes finished chips; this module writes what the
builder (``python -m nycdata build SOURCES.csv OUT_DIR``) starts from: per-parent
Sentinel-2 L2A and Sentinel-1 RTC scenes, a DEM and one WorldCover map, with the
mess real downloads have, so the whole chain can be tested without network:

- S2 bands at their native 10/20/60 m resolutions in separate files (or one
  stacked 12-band file at 10 m), uint16, nodata 0;
- two processing baselines: "03.00" scenes (before 2022-01-25) hold plain
  reflectance x 10000, "04.00" scenes hold it **+1000** (the BOA_ADD_OFFSET);
- S1 VV/VH as float32 *linear power* (or dB), with a fraction of pixels 0 =
  nodata (GeoTIFF nodata 0), on dates 1-3 days away from the S2 dates;
- the DEM in another CRS (EPSG:4326 by default) at ~30 m, bilinear-warped,
  covering the parent plus ~200 m; some parents may have none;
- one WorldCover map for all parents (EPSG:4326, 1/12000 deg ~ 10 m, uint8),
  using every WorldCover code, 0 = no data outside the parents and over a
  strip in the top-left 64 x 64 corner of the first parent (~70 % no data there,
  so a 64 px chip cut there falls under a 50 %-valid-labels rule);
- parents may sit in different UTM zones (``zone_override``).

Class signatures (S2 reflectance, S1 dB, DEM offsets) and the blob label maps
come from :mod:`nycdata.data.synthetic_scene`, shared with the chip fixture of
:mod:`nycdata.data.fixture`, so the data are learnable the same way.
Which baselines carry the +1000 offset, and from when, is the rule of
:mod:`nycdata.sources.manifest` (:func:`~nycdata.sources.manifest.needs_offset`).

Layout of ``out_dir``::

    sources.csv                         # the manifest (below)
    <parent>/S2L2A/<date>_<band>.tif    # s2_layout="per_band": one file per band at 10/20/60 m
    <parent>/S2L2A/<date>.tif           # s2_layout="stacked": 12 bands B01..B12 (no B10) at 10 m
    <parent>/S1RTC/<date>.tif           # 2 bands VV, VH at 10 m, float32, nodata 0
    <parent>/DEM/dem.tif                # 1 band float32 metres, in dem_crs (nodata -32767, none inside)
    worldcover/worldcover.tif           # 1 band uint8 WorldCover codes, in worldcover_crs, nodata 0
    truth/<parent>.npz                  # ground truth for builder tests (below)

Parents are ``p00``, ``p01``, ...; each is a square of ``parent_size_px`` pixels
at 10 m whose upper-left corner lies on a 60 m multiple of its UTM CRS, so the
10, 20 and 60 m files share that corner (the 20/60 m files cover
``ceil(size/2)``/``ceil(size/6)`` pixels, i.e. up to 50 m more than the parent).

``sources.csv`` columns, in this order: ``parent_id, modality, date, band,
path, cloud_cover, processing_baseline, product_id``. ``modality`` is S2L2A,
S1RTC, DEM or WORLDCOVER; ``date`` is ISO for S2L2A/S1RTC, empty otherwise;
``band`` names the band of a one-band file, empty when the file holds all bands
of its modality in canonical order; ``path`` is relative to the manifest's
folder; ``cloud_cover`` (0..40, metadata only: no clouds are painted) and
``processing_baseline`` ("03.00"/"04.00") are set on S2 rows only; the
WORLDCOVER row has ``parent_id`` "*" (all parents). It is written by
:func:`nycdata.sources.manifest.write_manifest` (rows in canonical order, so the
"*" row comes first). Read it with :func:`nycdata.sources.manifest.manifest_frame`
or ``pd.read_csv(path, dtype=str, keep_default_na=False)``, or "03.00" becomes 3.0.

``truth/<parent>.npz`` (``np.load``, no pickle) holds, on the parent's 10 m
grid (the grid of its B02 / stacked S2 file):

- ``classes``: uint8 (H, W), the true class 0..4 of every pixel;
- ``label``: uint8 (H, W), ``classes`` with 255 (ignore) where the WorldCover
  map says no data, i.e. what a builder should produce (up to one pixel at
  region borders: WorldCover went through a nearest-neighbour warp);
- ``worldcover``: uint8 (H, W), the WorldCover codes before that warp;
- ``dem``: float32 (H, W), the terrain in metres before the DEM warp;
- ``transform``: float64 (6,), the affine ``(a, b, c, d, e, f)`` of the grid;
- ``crs``: str, e.g. "EPSG:32618"; ``parent_id``: str;
- ``s2_dates``, ``s1_dates``, ``processing_baselines``: str (T,).

The same config writes byte-identical files (independent random streams per
parent and purpose, so e.g. ``s1_scale`` or ``s2_layout`` change nothing else).
"""

from __future__ import annotations

import datetime as dt
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nycdata.data.chips import NYC_BBOX, PIXEL_SIZE_M, S1RTC_BANDS, S2L2A_BANDS
from nycdata.data.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from nycdata.data.synthetic_scene import (DEM_OFFSET_M, S1_SIGNATURES_DB, S2_RED_EDGE_TO_NIR, S2_SIGNATURES,
                                          blob_labels, smooth_field)
from nycdata.io import replace_dir_atomically
from nycdata.sources.manifest import (ALL_PARENTS, MANIFEST_FILE, OFFSET_BASELINE, OFFSET_DATE, S2_OFFSET,
                                      baseline_has_offset, write_manifest)

WORLDCOVER_PATH = "worldcover/worldcover.tif"

S2_BAND_RESOLUTION_M = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
                        "B8A": 20, "B09": 60, "B11": 20, "B12": 20}
OLD_BASELINE = "03.00"  # the baseline of the scenes dated before OFFSET_DATE: no +1000 offset
S2_NODATA = 0
S1_NODATA = 0.0
DEM_NODATA = -32767.0
WORLDCOVER_NODATA = 0
WORLDCOVER_DEG = 1 / 12000  # ESA WorldCover's pixel size (~10 m)
ARCSEC_DEG = 1 / 3600       # Copernicus DEM GLO-30's pixel size (~30 m)

SCENE_MARGIN_PX = 48       # the simulated terrain extends this far around each parent (DEM source)
DEM_MARGIN_M = 200.0       # the DEM file covers the parent plus this
WORLDCOVER_MARGIN_M = 300.0
NODATA_CORNER_PX = 64      # parent 0: a strip of no-data WorldCover in its top-left 64 x 64 block ...
NODATA_CORNER_COLS = 45    # ... 45 of 64 columns wide: 70.3 % no data in that block
MIN_CLASS_PIXELS = 150     # every class gets at least a blob this big in every parent

# How each class splits into WorldCover codes (fractions of the class's pixels, by a smooth random field).
CODE_WEIGHTS = {0: (0.75, 0.15, 0.10), 1: (1.0,), 2: (0.8, 0.2), 3: (0.6, 0.4), 4: (0.45, 0.15, 0.40)}
S2_TILES = {18: "18TWL", 17: "17TQE", 19: "19TCF"}


@dataclass(frozen=True)
class SyntheticSourcesConfig:
    parents: int = 3
    parent_size_px: int = 160  # at 10 m
    dates_per_parent: int = 4
    seed: int = 0
    utm_crs: str = "EPSG:32618"
    s1_scale: str = "linear"  # "linear" power or "db"
    s2_layout: str = "per_band"  # "per_band" (native 10/20/60 m files) or "stacked" (one 12-band file at 10 m)
    dem_crs: str = "EPSG:4326"
    dem_resolution_m: float = 30.0
    worldcover_crs: str = "EPSG:4326"
    old_baseline_dates: int = 1  # per parent: S2 dates before 2022-01-25, baseline 03.00 (no +1000)
    s1_nodata_fraction: float = 0.02
    missing_dem_parents: tuple[str, ...] = ()
    zone_override: dict = field(default_factory=dict)  # parent index -> CRS, e.g. {1: "EPSG:32617"}

    def parent_ids(self) -> list[str]:
        return [f"p{i:02d}" for i in range(self.parents)]

    def check(self) -> None:
        from rasterio.crs import CRS

        if self.parents < 1:
            raise ValueError(f"parents {self.parents}: need at least 1")
        if self.parent_size_px < 16:
            raise ValueError(f"parent_size_px {self.parent_size_px}: need at least 16")
        if self.dates_per_parent < 1:
            raise ValueError(f"dates_per_parent {self.dates_per_parent}: need at least 1")
        if not 0 <= self.old_baseline_dates <= self.dates_per_parent:
            raise ValueError(f"old_baseline_dates {self.old_baseline_dates}: must be 0..dates_per_parent "
                             f"({self.dates_per_parent})")
        if self.s1_scale not in ("linear", "db"):
            raise ValueError(f"s1_scale {self.s1_scale!r}: choose 'linear' or 'db'")
        if self.s2_layout not in ("per_band", "stacked"):
            raise ValueError(f"s2_layout {self.s2_layout!r}: choose 'per_band' or 'stacked'")
        if not 0 <= self.s1_nodata_fraction < 1:
            raise ValueError(f"s1_nodata_fraction {self.s1_nodata_fraction}: must be in [0, 1)")
        if self.dem_resolution_m <= 0:
            raise ValueError(f"dem_resolution_m {self.dem_resolution_m}: must be positive")
        unknown = sorted(set(self.missing_dem_parents) - set(self.parent_ids()))
        if unknown:
            raise ValueError(f"missing_dem_parents {unknown}: not parent ids; the parents are {self.parent_ids()}")
        for index, crs in self.zone_override.items():
            if not isinstance(index, int) or not 0 <= index < self.parents:
                raise ValueError(f"zone_override key {index!r}: must be a parent index 0..{self.parents - 1}")
            if not CRS.from_user_input(crs).is_projected:
                raise ValueError(f"zone_override {index}: {crs} is not a projected (UTM) CRS")
        for name in ("utm_crs",):
            if not CRS.from_user_input(getattr(self, name)).is_projected:
                raise ValueError(f"{name} {getattr(self, name)}: not a projected (UTM) CRS")
        for name in ("dem_crs", "worldcover_crs"):
            CRS.from_user_input(getattr(self, name))  # raises on nonsense


def make_sources(out_dir: Path, config: SyntheticSourcesConfig = SyntheticSourcesConfig()) -> Path:
    """Write a synthetic raw source set to ``out_dir`` (absent or empty) and return its manifest path.

    Written to a temporary sibling first and moved into place at the end, so an
    interrupted run leaves nothing half-written. A non-empty ``out_dir`` is a
    :class:`FileExistsError`.
    """
    config.check()
    out_dir = Path(out_dir)
    with replace_dir_atomically(out_dir, overwrite=False) as tmp:
        _write_sources(tmp, config)
    return out_dir / MANIFEST_FILE


# ------------------------------------------------------------------ layout


@dataclass
class _Parent:
    index: int
    parent_id: str
    crs: str
    x0: float  # upper-left corner in crs, a multiple of 60 m
    y0: float
    size: int
    s2_dates: list[str]
    baselines: list[str]
    s1_dates: list[str]

    def transform(self, resolution: float = PIXEL_SIZE_M, margin_px: int = 0):
        from rasterio.transform import from_origin

        return from_origin(self.x0 - margin_px * PIXEL_SIZE_M, self.y0 + margin_px * PIXEL_SIZE_M, resolution, resolution)

    def bounds(self, margin_m: float = 0.0) -> tuple[float, float, float, float]:
        extent = self.size * PIXEL_SIZE_M
        return (self.x0 - margin_m, self.y0 - extent - margin_m, self.x0 + extent + margin_m, self.y0 + margin_m)


def _rng(config: SyntheticSourcesConfig, purpose: int, parent: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, purpose, parent])


def _place_parents(config: SyntheticSourcesConfig) -> list[tuple[str, float, float]]:
    """(crs, x0, y0) per parent: a jittered grid of squares inside the NYC bbox, gaps of >= ~360 m between them."""
    from pyproj import Transformer
    from rasterio.warp import transform_bounds

    rng = _rng(config, purpose=0)
    n, extent = config.parents, config.parent_size_px * PIXEL_SIZE_M
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    lon0, lat0, lon1, lat1 = NYC_BBOX
    m_per_deg_lat = 111_320.0
    m_per_deg_lon = 111_320.0 * math.cos(math.radians((lat0 + lat1) / 2))
    margin = 0.01
    transformers: dict[str, Transformer] = {}
    for _ in range(200):
        gap = rng.uniform(600.0, 1500.0)
        step = extent + gap
        width_deg, height_deg = ncols * step / m_per_deg_lon, nrows * step / m_per_deg_lat
        if width_deg > lon1 - lon0 - 2 * margin or height_deg > lat1 - lat0 - 2 * margin:
            raise ValueError(f"{n} parents of {config.parent_size_px} px do not fit into the NYC bbox {NYC_BBOX}")
        west = rng.uniform(lon0 + margin, lon1 - margin - width_deg)
        north = rng.uniform(lat0 + margin + height_deg, lat1 - margin)
        jitter = rng.uniform(-gap / 5, gap / 5, size=(n, 2))
        placed, footprints = [], []
        for i in range(n):
            r, c = divmod(i, ncols)
            lon = west + (c * step + step / 2 + jitter[i, 0]) / m_per_deg_lon
            lat = north - (r * step + step / 2 + jitter[i, 1]) / m_per_deg_lat
            crs = config.zone_override.get(i, config.utm_crs)
            if crs not in transformers:
                transformers[crs] = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
            x, y = transformers[crs].transform(lon, lat)
            x0 = round((x - extent / 2) / 60.0) * 60.0
            y0 = round((y + extent / 2) / 60.0) * 60.0
            placed.append((crs, x0, y0))
            footprints.append(transform_bounds(crs, "EPSG:4326", x0, y0 - extent, x0 + extent, y0, densify_pts=21))
        inside = all(lon0 <= w and s >= lat0 and e <= lon1 and nn <= lat1 for w, s, e, nn in footprints)
        disjoint = all(a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
                       for i, a in enumerate(footprints) for b in footprints[i + 1:])
        if inside and disjoint:
            return placed
    raise ValueError(f"could not place {n} non-overlapping parents of {config.parent_size_px} px in the NYC bbox")


def _dates(config: SyntheticSourcesConfig, rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """S2 dates (old baseline first), their baselines, and S1 dates 1-3 days off each S2 date.

    Candidates are 10 days apart (one satellite's revisit) within growing seasons,
    so S1 dates (shifted by at most 3 days) stay distinct.
    """
    def candidates(seasons):
        start = int(rng.integers(0, 10))
        days = []
        for first, last in seasons:
            day = first + dt.timedelta(days=start)
            while day <= last:
                days.append(day)
                day += dt.timedelta(days=10)
        return days

    old_pool = candidates([(dt.date(2021, 4, 1), dt.date(2021, 10, 31))])
    new_pool = candidates([(dt.date(2022, 4, 1), dt.date(2022, 10, 31)), (dt.date(2023, 4, 1), dt.date(2023, 10, 31))])
    n_old, n_new = config.old_baseline_dates, config.dates_per_parent - config.old_baseline_dates
    if n_old > len(old_pool) or n_new > len(new_pool):
        raise ValueError(f"dates_per_parent {config.dates_per_parent}: too many dates for the simulated seasons")
    old = sorted(old_pool[i] for i in rng.choice(len(old_pool), n_old, replace=False))
    new = sorted(new_pool[i] for i in rng.choice(len(new_pool), n_new, replace=False))
    assert all(d < OFFSET_DATE for d in old) and all(d >= OFFSET_DATE for d in new)
    s2 = old + new
    shifts = rng.integers(1, 4, size=len(s2)) * rng.choice([-1, 1], size=len(s2))
    s1 = [d + dt.timedelta(days=int(s)) for d, s in zip(s2, shifts)]
    return [d.isoformat() for d in s2], [OLD_BASELINE] * n_old + [OFFSET_BASELINE] * n_new, [d.isoformat() for d in s1]


# ------------------------------------------------------------------ writing


def _write_sources(out_dir: Path, config: SyntheticSourcesConfig) -> None:
    rows: list[dict] = []
    codes_per_parent = []
    parents = []
    for i, ((crs, x0, y0), pid) in enumerate(zip(_place_parents(config), config.parent_ids())):
        s2_dates, baselines, s1_dates = _dates(config, _rng(config, purpose=1, parent=i))
        parent = _Parent(i, pid, crs, x0, y0, config.parent_size_px, s2_dates, baselines, s1_dates)
        parents.append(parent)
        scene, terrain = _scene(parent, config)
        m, size = SCENE_MARGIN_PX, parent.size
        classes = scene[m:m + size, m:m + size]
        rows += _write_s2(out_dir, parent, scene, config)
        rows += _write_s1(out_dir, parent, classes, config)
        if pid not in config.missing_dem_parents:
            rows += _write_dem(out_dir, parent, terrain, config)
        codes = _worldcover_codes(parent, classes, config)
        codes_per_parent.append(codes)
        label = np.where(codes == WORLDCOVER_NODATA, IGNORE_INDEX, classes).astype(np.uint8)
        _write_npz(out_dir / "truth" / f"{pid}.npz", {
            "classes": classes, "label": label, "worldcover": codes,
            "dem": terrain[m:m + size, m:m + size], "transform": np.array(tuple(parent.transform())[:6], dtype=np.float64),
            "crs": np.array(crs), "parent_id": np.array(pid), "s2_dates": np.array(s2_dates),
            "s1_dates": np.array(s1_dates), "processing_baselines": np.array(baselines),
        })
    _write_worldcover(out_dir, parents, codes_per_parent, config)
    rows.append(_row(ALL_PARENTS, "WORLDCOVER", "", "", WORLDCOVER_PATH,
                     product_id=f"ESA_WorldCover_10m_2021_v200_{_worldcover_tile(parents)}_Map"))
    write_manifest(rows, out_dir)


def _row(parent_id, modality, date, band, path, cloud_cover=None, processing_baseline="", product_id="") -> dict:
    return {"parent_id": parent_id, "modality": modality, "date": date, "band": band, "path": path,
            "cloud_cover": cloud_cover, "processing_baseline": processing_baseline, "product_id": product_id}


def _scene(parent: _Parent, config: SyntheticSourcesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Class map and terrain (metres) on the parent's 10 m grid extended by SCENE_MARGIN_PX on every side."""
    rng = _rng(config, purpose=2, parent=parent.index)
    n = parent.size + 2 * SCENE_MARGIN_PX
    scene = blob_labels((n, n), rng)
    _ensure_every_class(scene, parent, rng)
    terrain = smooth_field((n, n), sigma=n / 3, rng=rng) * 15 + rng.uniform(5, 40)
    terrain = terrain + DEM_OFFSET_M[scene] + 0.5 * rng.standard_normal((n, n))
    return scene, terrain.astype(np.float32)


def _ensure_every_class(scene: np.ndarray, parent: _Parent, rng: np.random.Generator) -> None:
    """Paint a disk of each class that covers < MIN_CLASS_PIXELS of the parent, away from the no-data corner."""
    m, size = SCENE_MARGIN_PX, parent.size
    inner = scene[m:m + size, m:m + size]  # a view
    radius = min(7, size // 6)
    yy, xx = np.mgrid[:size, :size]
    for k in range(NUM_CLASSES):
        if (inner == k).sum() >= MIN_CLASS_PIXELS:
            continue
        low = NODATA_CORNER_PX + radius if size >= NODATA_CORNER_PX + 3 * radius else radius
        cy = int(rng.integers(low, size - radius))
        cx = int(rng.integers(radius, size - radius))
        inner[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = k


def _write_s2(out_dir: Path, parent: _Parent, scene: np.ndarray, config: SyntheticSourcesConfig) -> list[dict]:
    rng = _rng(config, purpose=3, parent=parent.index)
    meta = _rng(config, purpose=4, parent=parent.index)
    size, m = parent.size, SCENE_MARGIN_PX
    padded = 6 * math.ceil(size / 6)  # whole 60 m pixels
    labels = scene[m:m + padded, m:m + padded]
    zone = _utm_zone(parent.crs)
    rows = []
    for date, baseline in zip(parent.s2_dates, parent.baselines):
        reflectance = _s2_reflectance(labels, dt.date.fromisoformat(date), rng)
        offset = S2_OFFSET if baseline_has_offset(baseline) else 0
        per_band = {}
        for b, band in enumerate(S2L2A_BANDS):
            factor = S2_BAND_RESOLUTION_M[band] // PIXEL_SIZE_M
            coarse = reflectance[b].reshape(padded // factor, factor, padded // factor, factor).mean(axis=(1, 3))
            keep = math.ceil(size / factor)
            per_band[band] = np.clip(np.rint(coarse[:keep, :keep]) + offset, 1, 65535).astype(np.uint16)
        cloud = round(float(meta.uniform(0, 40)), 4)
        stamp = date.replace("-", "")
        product = (f"S2{'AB'[int(meta.integers(0, 2))]}_MSIL2A_{stamp}T154911_N{baseline.replace('.', '')}_R054_"
                   f"T{S2_TILES.get(zone, f'{zone}TXX')}_{stamp}T200409")
        if config.s2_layout == "per_band":
            for band in S2L2A_BANDS:
                resolution = S2_BAND_RESOLUTION_M[band]
                rel = f"{parent.parent_id}/S2L2A/{date}_{band}.tif"
                _write_tif(out_dir / rel, per_band[band][None], parent.crs, parent.transform(resolution), S2_NODATA, [band])
                rows.append(_row(parent.parent_id, "S2L2A", date, band, rel, cloud, baseline, product))
        else:
            stack = np.stack([_upsample(per_band[band], S2_BAND_RESOLUTION_M[band] // PIXEL_SIZE_M)[:size, :size]
                              for band in S2L2A_BANDS])
            rel = f"{parent.parent_id}/S2L2A/{date}.tif"
            _write_tif(out_dir / rel, stack, parent.crs, parent.transform(), S2_NODATA, list(S2L2A_BANDS))
            rows.append(_row(parent.parent_id, "S2L2A", date, "", rel, cloud, baseline, product))
    return rows


def _s2_reflectance(labels: np.ndarray, date: dt.date, rng: np.random.Generator) -> np.ndarray:
    """(12, H, W) reflectance x 10000: class signatures, vegetation season by day of year, scene brightness, noise."""
    doy = date.timetuple().tm_yday
    season = 0.8 + 0.35 * math.exp(-(((doy - 200) / 55.0) ** 2))  # green-up peaking mid-July
    spectra = S2_SIGNATURES.copy()
    spectra[2:4, S2_RED_EDGE_TO_NIR] *= season
    reflectance = spectra[labels].transpose(2, 0, 1) * rng.uniform(0.95, 1.05)
    reflectance *= 1 + 0.08 * rng.standard_normal(reflectance.shape)
    reflectance += 40 * rng.standard_normal(reflectance.shape)
    return reflectance


def _upsample(array: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1) if factor > 1 else array


def _write_s1(out_dir: Path, parent: _Parent, classes: np.ndarray, config: SyntheticSourcesConfig) -> list[dict]:
    rng = _rng(config, purpose=5, parent=parent.index)
    size = parent.size
    n_nodata = int(round(config.s1_nodata_fraction * size * size))
    rows = []
    for t, date in enumerate(parent.s1_dates):
        db = S1_SIGNATURES_DB[classes].transpose(2, 0, 1) + rng.uniform(-0.7, 0.7, size=(2, 1, 1))
        db = db + 1.5 * rng.standard_normal((2, size, size))
        values = 10 ** (db / 10) if config.s1_scale == "linear" else db
        values = values.astype(np.float32)
        if config.s1_scale == "db":
            values[values == S1_NODATA] = np.float32(-1e-3)  # a valid pixel is never exactly the nodata 0
        nodata = rng.choice(size * size, n_nodata, replace=False)
        values.reshape(2, -1)[:, nodata] = S1_NODATA
        rel = f"{parent.parent_id}/S1RTC/{date}.tif"
        _write_tif(out_dir / rel, values, parent.crs, parent.transform(), S1_NODATA, list(S1RTC_BANDS))
        stamp = date.replace("-", "")
        orbit = 36_000 + (dt.date.fromisoformat(date) - dt.date(2021, 1, 1)).days * 175 // 12  # ~14.6 orbits a day
        product = (f"S1A_IW_GRDH_1SDV_{stamp}T225045_{stamp}T225110_{orbit:06d}_"
                   f"{int(rng.integers(0, 16 ** 6)):06X}_{int(rng.integers(0, 16 ** 4)):04X}_RTC")
        rows.append(_row(parent.parent_id, "S1RTC", date, "", rel, product_id=product))
    return rows


def _write_dem(out_dir: Path, parent: _Parent, terrain: np.ndarray, config: SyntheticSourcesConfig) -> list[dict]:
    from rasterio.warp import Resampling, reproject

    transform, shape = _target_grid([(parent.crs, parent.bounds(DEM_MARGIN_M))], config.dem_crs,
                                    _resolution(config.dem_crs, config.dem_resolution_m, ARCSEC_DEG / 30.0))
    dem = np.full(shape, DEM_NODATA, dtype=np.float32)
    reproject(terrain, dem, src_transform=parent.transform(margin_px=SCENE_MARGIN_PX), src_crs=parent.crs,
              dst_transform=transform, dst_crs=config.dem_crs, dst_nodata=DEM_NODATA, resampling=Resampling.bilinear)
    rel = f"{parent.parent_id}/DEM/dem.tif"
    _write_tif(out_dir / rel, dem[None], config.dem_crs, transform, DEM_NODATA, ["DEM"])
    lon, lat = _center_lonlat(parent)
    tile = f"{'N' if lat >= 0 else 'S'}{abs(math.floor(lat)):02d}_00_{'W' if lon < 0 else 'E'}{abs(math.floor(lon)):03d}_00"
    return [_row(parent.parent_id, "DEM", "", "DEM", rel, product_id=f"Copernicus_DSM_COG_10_{tile}_DEM")]


def _worldcover_codes(parent: _Parent, classes: np.ndarray, config: SyntheticSourcesConfig) -> np.ndarray:
    """WorldCover code per pixel: each class split among its codes by rank of a smooth random field."""
    rng = _rng(config, purpose=6, parent=parent.index)
    field_ = smooth_field(classes.shape, sigma=4.0, rng=rng)
    codes = np.zeros(classes.shape, dtype=np.uint8)
    for cls in CLASSES:
        mask = classes == cls.index
        count = int(mask.sum())
        if not count:
            continue
        ranks = np.empty(count, dtype=np.int64)
        ranks[np.argsort(field_[mask], kind="stable")] = np.arange(count)
        bounds = np.cumsum(CODE_WEIGHTS[cls.index])[:-1] * count
        codes[mask] = np.asarray(cls.worldcover_codes, dtype=np.uint8)[np.searchsorted(bounds, ranks, side="right")]
    if parent.index == 0:
        rows = min(NODATA_CORNER_PX, parent.size)
        cols = round(NODATA_CORNER_COLS / NODATA_CORNER_PX * rows)
        codes[:rows, :cols] = WORLDCOVER_NODATA
    return codes


def _write_worldcover(out_dir: Path, parents: list[_Parent], codes: list[np.ndarray], config: SyntheticSourcesConfig) -> None:
    from rasterio.warp import Resampling, reproject

    crs = config.worldcover_crs
    transform, shape = _target_grid([(p.crs, p.bounds(WORLDCOVER_MARGIN_M)) for p in parents], crs,
                                    _resolution(crs, PIXEL_SIZE_M, WORLDCOVER_DEG / PIXEL_SIZE_M))
    mosaic = np.full(shape, WORLDCOVER_NODATA, dtype=np.uint8)
    for parent, parent_codes in zip(parents, codes):
        warped = np.full(shape, WORLDCOVER_NODATA, dtype=np.uint8)
        reproject(parent_codes, warped, src_transform=parent.transform(), src_crs=parent.crs, src_nodata=WORLDCOVER_NODATA,
                  dst_transform=transform, dst_crs=crs, dst_nodata=WORLDCOVER_NODATA, resampling=Resampling.nearest)
        mosaic = np.where(warped != WORLDCOVER_NODATA, warped, mosaic)
    _write_tif(out_dir / WORLDCOVER_PATH, mosaic[None], crs, transform, WORLDCOVER_NODATA, ["Map"])


# ------------------------------------------------------------------ helpers


def _resolution(crs: str, metres: float, degrees_per_metre: float) -> float:
    from rasterio.crs import CRS

    return metres * degrees_per_metre if CRS.from_user_input(crs).is_geographic else metres


def _target_grid(boxes, dst_crs: str, resolution: float):
    """Transform and (H, W) of a north-up grid in ``dst_crs`` covering every (crs, bounds) box, snapped to ``resolution``."""
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    lefts, bottoms, rights, tops = zip(*(transform_bounds(crs, dst_crs, *bounds, densify_pts=21) for crs, bounds in boxes))
    # Snap outwards to whole pixels; round first so float noise never adds a pixel.
    left = math.floor(round(min(lefts) / resolution, 6)) * resolution
    top = math.ceil(round(max(tops) / resolution, 6)) * resolution
    width = math.ceil(round((max(rights) - left) / resolution, 6))
    height = math.ceil(round((top - min(bottoms)) / resolution, 6))
    return from_origin(left, top, resolution, resolution), (height, width)


def _center_lonlat(parent: _Parent) -> tuple[float, float]:
    from pyproj import Transformer

    left, bottom, right, top = parent.bounds()
    return Transformer.from_crs(parent.crs, "EPSG:4326", always_xy=True).transform((left + right) / 2, (bottom + top) / 2)


def _worldcover_tile(parents: list[_Parent]) -> str:
    lon, lat = _center_lonlat(parents[0])
    lat3, lon3 = 3 * math.floor(lat / 3), 3 * math.floor(lon / 3)
    return f"{'N' if lat3 >= 0 else 'S'}{abs(lat3):02d}{'W' if lon3 < 0 else 'E'}{abs(lon3):03d}"


def _utm_zone(crs: str) -> int:
    from rasterio.crs import CRS

    epsg = CRS.from_user_input(crs).to_epsg() or 0
    return epsg % 100 if 32601 <= epsg <= 32660 or 32701 <= epsg <= 32760 else 0


def _write_tif(path: Path, array: np.ndarray, crs, transform, nodata, descriptions) -> None:
    """A (bands, H, W) deflate GeoTIFF with nodata and band descriptions; deterministic bytes."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    bands, height, width = array.shape
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype=array.dtype.name, crs=crs,
                   transform=transform, nodata=nodata, compress="deflate", tiled=False, interleave="band")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        for i, text in enumerate(descriptions, start=1):
            dst.set_band_description(i, text)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so the bytes depend on the arrays only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)
