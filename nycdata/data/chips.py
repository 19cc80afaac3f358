"""The on-disk chip format: dataset manifest, chip files and the chip index.

A dataset directory looks like this::

    DATA_DIR/
      dataset.json                  # DatasetSpec: chip size, timesteps, modalities
      chips.parquet                 # chip index (GeoParquet), one row per chip
      S2L2A/<chip_id>_S2L2A.tif     # T x 12 bands, time-major, int16/uint16, reflectance x 10000
      S1RTC/<chip_id>_S1RTC.tif     # T x 2 bands (VV, VH), time-major, float32, dB
      DEM/<chip_id>_DEM.tif         # 1 band, metres (repeated over T when read)
      LULC/<chip_id>_LULC.tif       # label: 1 band uint8, classes 0..4, 255 = ignore

"Time-major" means band ``t * n_bands + b`` (0-based) holds band ``b`` of
timestep ``t``. All files of one chip share CRS, transform and size. The
per-modality folders and ``<id>_<MOD>.tif`` names follow terratorch's
``GenericMultiModalDataModule`` convention, so the files can also be read by it.

The chip index has one row per chip with columns ``chip_id``, ``parent_id``,
``split`` (train/val/test), ``row``/``col`` within the parent, ``crs`` (the
chip's own CRS), ``dates`` (ISO date per timestep, ``|``-separated),
``count_<class>`` pixel counts (see :mod:`nycdata.data.classes`) plus
``count_ignore``, ``path_<MOD>`` relative to DATA_DIR, and the footprint
``geometry`` in EPSG:4326, the one CRS that fits chips from any UTM zone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nycdata.data.classes import CLASS_NAMES

if TYPE_CHECKING:
    import pandas as pd

FORMAT_VERSION = "nycdata-chips/1"
SPEC_FILE = "dataset.json"
INDEX_FILE = "chips.parquet"
INDEX_CRS = "EPSG:4326"
SPLITS = ("train", "val", "test")
LABEL = "LULC"

NYC_BBOX: tuple[float, float, float, float] = (-74.30, 40.45, -73.65, 40.95)  # the study area: lon/lat min, max
PATCH_SIZE = 16  # TerraMind's patch: chip sizes are multiples of it, and a thought is one token per patch
PIXEL_SIZE_M = 10  # every chip is on a 10 m grid

# TerraMind v1 pretraining statistics (S1RTC in dB, DEM in metres).
TERRAMIND_V1_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "S2L2A": (
        (1390.458, 1503.317, 1718.197, 1853.910, 2199.100, 2779.975, 2987.011, 3083.234, 3132.220, 3162.988, 2424.884, 1857.648),
        (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257, 1871.918, 1753.829, 1797.379, 1434.261, 1334.311),
    ),
    "S1RTC": ((-10.93, -17.329), (4.391, 4.459)),
    "DEM": ((670.665,), (951.272,)),
}
NORMALIZATIONS = {"terramind_v1": TERRAMIND_V1_STATS}

S2L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1RTC_BANDS = ("VV", "VH")


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    bands: tuple[str, ...]
    per_timestep: bool  # False: one set of bands for all timesteps (DEM, label)
    dtypes: tuple[str, ...]  # allowed on disk; the first is what writers use

    def band_count(self, timesteps: int) -> int:
        return len(self.bands) * (timesteps if self.per_timestep else 1)

    def band_descriptions(self, timesteps: int) -> list[str]:
        if not self.per_timestep:
            return list(self.bands)
        return [f"t{t}_{band}" for t in range(timesteps) for band in self.bands]


MODALITIES: dict[str, ModalitySpec] = {
    "S2L2A": ModalitySpec("S2L2A", S2L2A_BANDS, True, ("int16", "uint16")),
    "S1RTC": ModalitySpec("S1RTC", S1RTC_BANDS, True, ("float32",)),
    "DEM": ModalitySpec("DEM", ("DEM",), False, ("float32", "int16")),
    LABEL: ModalitySpec(LABEL, ("class",), False, ("uint8",)),
}
INPUT_MODALITIES = ("S2L2A", "S1RTC", "DEM")


@dataclass(frozen=True)
class DatasetSpec:
    """What every chip of a dataset looks like; stored as ``dataset.json``."""

    chip_size: int
    timesteps: int
    modalities: tuple[str, ...] = INPUT_MODALITIES
    label: str = LABEL
    format: str = FORMAT_VERSION
    source: dict = field(default_factory=dict)  # who made it and with which settings

    def all_modalities(self) -> tuple[str, ...]:
        return (*self.modalities, self.label)

    def write(self, data_dir: Path) -> None:
        payload = asdict(self)
        payload["modalities"] = list(self.modalities)
        (Path(data_dir) / SPEC_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, data_dir: Path) -> "DatasetSpec":
        path = Path(data_dir) / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {data_dir} is not a chip dataset. Create one with "
                "`python -m nycdata fixture DIR` (synthetic) or `python -m nycdata build` (real data)."
            )
        try:
            payload = json.loads(path.read_text())
            payload["modalities"] = tuple(payload["modalities"])
            spec = cls(**payload)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a valid dataset manifest: {err}") from err
        if spec.format != FORMAT_VERSION:
            raise ValueError(f"{path}: format {spec.format!r}, this nycdata reads {FORMAT_VERSION!r}")
        unknown = set(spec.all_modalities()) - set(MODALITIES)
        if unknown:
            raise ValueError(f"{path}: unknown modalities {sorted(unknown)}; known: {sorted(MODALITIES)}")
        return spec


def chip_id(parent_id: str, row: int, col: int) -> str:
    return f"nyc_{parent_id}_r{row}c{col}"


def chip_relpath(chip: str, modality: str) -> str:
    return f"{modality}/{chip}_{modality}.tif"


def path_column(modality: str) -> str:
    return f"path_{modality}"


def count_columns() -> list[str]:
    return [f"count_{name}" for name in CLASS_NAMES] + ["count_ignore"]


def write_raster(path: Path, array: np.ndarray, crs, transform, descriptions=None) -> None:
    """Write a (bands, H, W) array as a deflate-compressed GeoTIFF, deterministically."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    bands, height, width = array.shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=bands, dtype=array.dtype.name,
        crs=crs, transform=transform, compress="deflate", tiled=False, interleave="band",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        for i, text in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, text)


def write_index(data_dir: Path, index) -> Path:
    """Write the chip index GeoDataFrame (sorted by chip_id) to ``chips.parquet``."""
    index = index.sort_values("chip_id").reset_index(drop=True)
    path = Path(data_dir) / INDEX_FILE
    index.to_parquet(path, index=False)
    return path


def read_index(data_dir: Path):
    """Read ``chips.parquet`` as a GeoDataFrame, with a clear error when absent."""
    import geopandas as gpd

    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"chip index {path} not found. Build a dataset first (`python -m nycdata fixture {data_dir}`)."
        )
    return gpd.read_parquet(path)


def split_dates(dates: str) -> list[str]:
    return [d for d in str(dates).split("|") if d]


def split_labels(n_parents: int, fractions) -> list[str]:
    """The grouped split's counts as a list of labels: ``fractions`` (train, val, test) of the parents, rounded, at
    least one test and one val parent, the rest train. Shuffling parents onto these labels is left to the caller
    (the fixture and the builder draw their permutations differently, and keep doing so)."""
    n_test = max(1, round(fractions[2] * n_parents))
    n_val = max(1, round(fractions[1] * n_parents))
    return ["test"] * n_test + ["val"] * n_val + ["train"] * (n_parents - n_test - n_val)


@dataclass(frozen=True)
class SplitSpec:
    """Which chips train, validate and test: the index's fixed ``split`` column, or fold ``fold`` of a grouped
    K-fold cross-validation over parents (``cv_folds`` >= 2).

    With folds every parent is a test parent exactly once, so the comparison rests on all parents instead of the
    fixed split's few. Parents go to folds deterministically from ``seed`` (shuffled, then each to the fold with the
    fewest chips so far, so folds hold about as many chips); each fold's validation parents are drawn from its
    training parents, about ``fractions[1] / (fractions[0] + fractions[1])`` of them and at least one.
    """

    cv_folds: int = 0
    fold: int = 0
    seed: int = 42
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def check(self) -> None:
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds={self.cv_folds}: use 0 (the index's fixed split) or at least 2 folds")
        if self.cv_folds and not 0 <= self.fold < self.cv_folds:
            raise ValueError(f"fold={self.fold}: with cv_folds={self.cv_folds} it must be 0..{self.cv_folds - 1}")

    def assign(self, index) -> "pd.Series":
        """Split per chip (indexed like ``index``) under this spec."""
        self.check()
        if not self.cv_folds:
            return index["split"]
        roles = fold_roles(index, self)
        return index["parent_id"].map(roles.loc[roles["fold"] == self.fold].set_index("parent_id")["split"])


def fold_roles(index, spec: SplitSpec) -> "pd.DataFrame":
    """Every parent's split in every fold (columns fold, parent_id, split, chips): the record of ``folds.csv``."""
    import pandas as pd

    spec.check()
    sizes = index.groupby("parent_id").size().sort_index()
    if len(sizes) < spec.cv_folds:
        raise ValueError(f"cv_folds={spec.cv_folds} needs at least as many parents as folds, the index has "
                         f"{len(sizes)}; lower cv_folds")
    test_fold = _balanced_folds(sizes, spec.cv_folds, spec.seed)
    rows = []
    for fold in range(spec.cv_folds):
        rest = sorted(p for p, f in test_fold.items() if f != fold)
        if len(rest) < 2:
            raise ValueError(f"cv_folds={spec.cv_folds}: fold {fold} leaves {len(rest)} parent(s) for training and "
                             "validation, need at least 2; lower cv_folds")
        share = spec.fractions[1] / (spec.fractions[0] + spec.fractions[1])
        n_val = min(len(rest) - 1, max(1, round(share * len(rest))))
        val = {rest[i] for i in np.random.default_rng([spec.seed, fold]).permutation(len(rest))[:n_val]}
        rows += [{"fold": fold, "parent_id": p, "chips": int(sizes[p]),
                  "split": "test" if test_fold[p] == fold else "val" if p in val else "train"} for p in sizes.index]
    return pd.DataFrame(rows, columns=["fold", "parent_id", "split", "chips"])


def _balanced_folds(sizes, k: int, seed: int) -> dict[str, int]:
    """Parents in a seeded random order, each to the fold holding the fewest chips so far (ties: lowest fold)."""
    load = [0] * k
    assignment = {}
    for i in np.random.default_rng(seed).permutation(len(sizes)):
        fold = min(range(k), key=lambda f: (load[f], f))
        assignment[sizes.index[i]] = fold
        load[fold] += int(sizes.iloc[i])
    return assignment
