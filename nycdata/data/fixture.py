"""A synthetic, learnable, deterministic NYC dataset in the chip format.

Tests, the demo and ``params/fixture.yaml`` use it in place of the real data,
which cannot be downloaded on CI. It is built to be *learnable*: labels are
spatially coherent blobs and every input modality carries a class-dependent
signature (water: dark in NIR and radar; vegetation: bright NIR; developed:
bright, flat radar; bare: bright SWIR) plus noise, so a small model fits it
within a few dozen steps. The signatures and blob label maps come from
:mod:`nycdata.data.synthetic_scene`, shared with the synthetic raw sources of
:mod:`nycdata.sources.synthetic`. The same seed gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nycdata.data import chips
from nycdata.data.chips import NYC_BBOX, PIXEL_SIZE_M
from nycdata.data.classes import IGNORE_INDEX, class_counts
from nycdata.data.synthetic_scene import (DEM_OFFSET_M, S1_SIGNATURES_DB, S2_RED_EDGE_TO_NIR, S2_SIGNATURES,
                                          blob_labels, smooth_field)
from nycdata.io import replace_dir_atomically

UTM_CRS = "EPSG:32618"
# dataset.json's generator: this module, under its name since the package got its layers and before
FIXTURE_GENERATORS = ("nycdata.data.fixture", "nycdata.fixture")


@dataclass(frozen=True)
class FixtureConfig:
    chips: int = 16
    size: int = 64
    timesteps: int = 2
    seed: int = 0
    chips_per_parent: int = 4

    def check(self) -> None:
        if self.chips < 3:
            raise ValueError(f"--chips {self.chips}: need at least 3 chips (one parent each for train, val, test)")
        if self.size < 16 or self.size % 16:
            raise ValueError(f"--size {self.size}: must be a multiple of 16 (TerraMind's patch size), at least 16")
        if self.timesteps < 1:
            raise ValueError(f"--timesteps {self.timesteps}: must be at least 1")
        if self.chips_per_parent < 1:
            raise ValueError(f"chips_per_parent {self.chips_per_parent}: must be at least 1")


def make_fixture(out_dir: Path, config: FixtureConfig = FixtureConfig(), overwrite: bool = False) -> Path:
    """Write a fixture dataset to ``out_dir`` and return it.

    Everything is written to a temporary sibling first and moved into place at
    the end, so an interrupted run never leaves a half-written dataset.
    """
    config.check()
    with replace_dir_atomically(Path(out_dir), overwrite=overwrite) as tmp:
        _write_fixture(tmp, config)
    return Path(out_dir)


def ensure_fixture(data_dir: Path, config: FixtureConfig) -> Path:
    """Generate the fixture at ``data_dir`` unless the same one is already there."""
    spec_path = Path(data_dir) / chips.SPEC_FILE
    if spec_path.is_file():
        source = chips.DatasetSpec.read(data_dir).source
        if source.get("generator") in FIXTURE_GENERATORS and source.get("config") == _config_dict(config):
            return Path(data_dir)
        raise FileExistsError(
            f"{data_dir} holds a dataset that is not the fixture these params ask for "
            f"({_config_dict(config)}); point data_root elsewhere or delete it."
        )
    return make_fixture(data_dir, config)


def _config_dict(config: FixtureConfig) -> dict:
    return {k: getattr(config, k) for k in ("chips", "size", "timesteps", "seed", "chips_per_parent")}


def _write_fixture(out_dir: Path, config: FixtureConfig) -> None:
    import geopandas as gpd

    rng = np.random.default_rng(config.seed)
    parents = _layout_parents(config, rng)
    rows = []
    for parent in parents:
        rows.extend(_write_parent(out_dir, parent, config, rng))
    index = gpd.GeoDataFrame(rows, geometry="geometry", crs=UTM_CRS).to_crs(chips.INDEX_CRS)
    chips.write_index(out_dir, index)
    spec = chips.DatasetSpec(
        chip_size=config.size, timesteps=config.timesteps,
        source={"generator": FIXTURE_GENERATORS[0], "config": _config_dict(config)},
    )
    spec.write(out_dir)


@dataclass
class _Parent:
    parent_id: str
    split: str
    n_chips: int
    grid_cols: int
    origin_xy: tuple[float, float]  # UTM upper-left corner
    dates: list[str]


def _layout_parents(config: FixtureConfig, rng: np.random.Generator) -> list[_Parent]:
    n_parents = max(3, math.ceil(config.chips / config.chips_per_parent))
    sizes = [config.chips // n_parents + (p < config.chips % n_parents) for p in range(n_parents)]
    splits = _grouped_splits(n_parents, rng)
    x_min, y_min, x_max, y_max = _utm_bbox()
    parents = []
    for p, n in enumerate(sizes):
        cols = math.ceil(math.sqrt(n))
        extent = cols * config.size * PIXEL_SIZE_M
        x0 = x_min + rng.uniform(0, x_max - x_min - extent)
        y0 = y_max - rng.uniform(0, y_max - y_min - extent)
        first = dt.date(2021, 4, 1) + dt.timedelta(days=int(rng.integers(0, 30)))
        dates = [(first + dt.timedelta(days=45 * t)).isoformat() for t in range(config.timesteps)]
        parents.append(_Parent(f"fx{p:02d}", splits[p], n, cols, (round(x0, -1), round(y0, -1)), dates))
    return parents


def _grouped_splits(n_parents: int, rng: np.random.Generator) -> list[str]:
    """Whole parents go to one split: at least one each, about 70/15/15."""
    labels = chips.split_labels(n_parents, (0.7, 0.15, 0.15))
    return [labels[i] for i in rng.permutation(n_parents)]


def _utm_bbox() -> tuple[float, float, float, float]:
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", UTM_CRS, always_xy=True)
    lon0, lat0, lon1, lat1 = NYC_BBOX
    xs, ys = to_utm.transform([lon0, lon1, lon0, lon1], [lat0, lat0, lat1, lat1])
    # The inner rectangle, so every chip lies inside the lon/lat bbox.
    return max(xs[0], xs[2]), max(ys[0], ys[1]), min(xs[1], xs[3]), min(ys[2], ys[3])


def _write_parent(out_dir: Path, parent: _Parent, config: FixtureConfig, rng: np.random.Generator) -> list[dict]:
    from rasterio.transform import from_origin
    from shapely.geometry import box

    size, T = config.size, config.timesteps
    grid_rows = math.ceil(parent.n_chips / parent.grid_cols)
    shape = (grid_rows * size, parent.grid_cols * size)
    label = blob_labels(shape, rng)
    terrain = smooth_field(shape, sigma=shape[0] / 3, rng=rng) * 15 + rng.uniform(5, 40)
    rows = []
    for i in range(parent.n_chips):
        r, c = divmod(i, parent.grid_cols)
        window = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
        chip_label = label[window].copy()
        _punch_ignore(chip_label, rng)
        x0 = parent.origin_xy[0] + c * size * PIXEL_SIZE_M
        y0 = parent.origin_xy[1] - r * size * PIXEL_SIZE_M
        transform = from_origin(x0, y0, PIXEL_SIZE_M, PIXEL_SIZE_M)
        cid = chips.chip_id(parent.parent_id, r, c)
        arrays = _chip_arrays(label[window], terrain[window], T, rng)
        arrays[chips.LABEL] = chip_label[None]
        row = {"chip_id": cid, "parent_id": parent.parent_id, "split": parent.split, "row": r, "col": c,
               "crs": UTM_CRS, "dates": "|".join(parent.dates)}
        for modality, array in arrays.items():
            rel = chips.chip_relpath(cid, modality)
            descriptions = chips.MODALITIES[modality].band_descriptions(T)
            chips.write_raster(out_dir / rel, array, UTM_CRS, transform, descriptions)
            row[chips.path_column(modality)] = rel
        row.update({f"count_{k}": v for k, v in class_counts(chip_label).items()})
        row["geometry"] = box(x0, y0 - size * PIXEL_SIZE_M, x0 + size * PIXEL_SIZE_M, y0)
        rows.append(row)
    return rows


def _punch_ignore(label: np.ndarray, rng: np.random.Generator) -> None:
    """A no-data rectangle in about a third of the chips (up to ~10 % of pixels)."""
    if rng.random() >= 0.33:
        return
    h, w = label.shape
    rh, rw = int(rng.integers(h // 8, h // 3)), int(rng.integers(w // 8, w // 3))
    top, left = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
    label[top:top + rh, left:left + rw] = IGNORE_INDEX


def _chip_arrays(label: np.ndarray, terrain: np.ndarray, T: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, w = label.shape
    s2 = np.empty((T, 12, h, w))
    s1 = np.empty((T, 2, h, w))
    for t in range(T):
        season = 0.85 + 0.3 * (t / max(T - 1, 1))  # vegetation greens up over the season
        spectra = S2_SIGNATURES.copy()
        spectra[2:4, S2_RED_EDGE_TO_NIR] *= season
        brightness = rng.uniform(0.95, 1.05)  # per-scene atmosphere
        s2[t] = spectra[label].transpose(2, 0, 1) * brightness
        s2[t] *= 1 + 0.08 * rng.standard_normal((12, h, w))
        s2[t] += 40 * rng.standard_normal((12, h, w))
        s1[t] = S1_SIGNATURES_DB[label].transpose(2, 0, 1) + 1.5 * rng.standard_normal((2, h, w))
    dem = terrain + DEM_OFFSET_M[label] + 0.5 * rng.standard_normal((h, w))
    return {
        "S2L2A": np.clip(np.rint(s2), 1, 10000).astype(np.int16).reshape(T * 12, h, w),
        "S1RTC": s1.astype(np.float32).reshape(T * 2, h, w),
        "DEM": dem.astype(np.float32)[None],
    }
