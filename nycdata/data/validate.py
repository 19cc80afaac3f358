"""Every check of a chip dataset, shared by ``python -m nycdata validate`` and the data loaders.

:func:`validate_dataset` reports *all* problems of a dataset (each naming the
chip and the file); :func:`read_chip` runs the same per-chip checks while it
reads, and raises one :class:`ChipError` naming the chip and file instead of
a deep rasterio or collate traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from nycdata.data import chips
from nycdata.data.classes import IGNORE_INDEX, NUM_CLASSES

REQUIRED_COLUMNS = ("chip_id", "parent_id", "split", "crs", "dates", "geometry")
MISSING_COLUMNS = "index lacks columns"
VALID_LABELS = frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}


@dataclass(frozen=True)
class Problem:
    chip_id: str | None  # None: the problem concerns the whole dataset
    path: str | None
    message: str

    def __str__(self) -> str:
        where = self.chip_id or "<dataset>"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ChipError(ValueError):
    """A chip cannot be used; the message names the chip, the file and what to do."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(f"invalid chip data:\n  {lines}\nRun `python -m nycdata validate DATA_DIR` to list every problem.")


def read_chip(data_dir: Path, spec: chips.DatasetSpec, record: Mapping, modalities=None) -> dict[str, np.ndarray]:
    """Read modalities of one chip (default: all) as ``{modality: (bands, H, W) array}``, checking them."""
    arrays, problems = inspect_chip(data_dir, spec, record, modalities)
    if problems:
        raise ChipError(problems)
    return arrays


def inspect_chip(data_dir: Path, spec: chips.DatasetSpec, record: Mapping,
                 modalities=None) -> tuple[dict[str, np.ndarray], list[Problem]]:
    """Read and check the files of one chip (default: every modality); return the arrays and the problems."""
    cid = str(record["chip_id"])
    arrays: dict[str, np.ndarray] = {}
    problems: list[Problem] = []
    reference = None  # (crs, transform, file) of the first readable modality
    n_dates = len(chips.split_dates(record.get("dates", "")))
    if n_dates != spec.timesteps:
        problems.append(Problem(cid, None, f"index lists {n_dates} dates, the dataset has {spec.timesteps} timesteps"))
    for modality in modalities or spec.all_modalities():
        rel = record.get(chips.path_column(modality))
        if not isinstance(rel, str) or not rel:
            problems.append(Problem(cid, None, f"index has no {chips.path_column(modality)} entry"))
            continue
        array, georef, file_problems = _read_checked(Path(data_dir) / rel, cid, modality, spec, record)
        problems.extend(file_problems)
        if georef is None:
            continue
        if reference is None:
            reference = (*georef, rel)
        elif georef != reference[:2]:
            problems.append(Problem(cid, str(Path(data_dir) / rel),
                                    f"CRS/transform differ from {reference[2]}; all modalities of a chip must share one grid"))
        if array is not None:
            arrays[modality] = array
    return arrays, problems


def _read_checked(path: Path, cid: str, modality: str, spec: chips.DatasetSpec, record: Mapping):
    """Open one chip file and check it; returns (array or None, (crs, transform) or None, problems)."""
    import rasterio
    from rasterio.errors import RasterioError

    mod = chips.MODALITIES[modality]
    where = str(path)
    if not path.is_file():
        return None, None, [Problem(cid, where, f"missing {modality} file")]
    try:
        with rasterio.open(path) as src:
            header = (src.count, src.height, src.width, src.dtypes[0], src.crs, src.transform)
            array = src.read()
    except (RasterioError, OSError, ValueError) as err:
        return None, None, [Problem(cid, where, f"unreadable or corrupt GeoTIFF ({err}); rebuild this chip")]
    count, height, width, dtype, crs, transform = header
    problems = []
    expected_bands = mod.band_count(spec.timesteps)
    if count != expected_bands:
        problems.append(Problem(cid, where, f"{modality} has {count} bands, expected {expected_bands} "
                                            f"({len(mod.bands)} x {spec.timesteps if mod.per_timestep else 1} timesteps)"))
    if (height, width) != (spec.chip_size, spec.chip_size):
        problems.append(Problem(cid, where, f"size {height}x{width}, expected {spec.chip_size}x{spec.chip_size}"))
    if dtype not in mod.dtypes:
        problems.append(Problem(cid, where, f"dtype {dtype}, expected one of {list(mod.dtypes)}"))
    if crs is None or str(record.get("crs")) not in (crs.to_string(), str(crs)):
        problems.append(Problem(cid, where, f"CRS {crs} does not match the index ({record.get('crs')})"))
    problems.extend(_check_values(array, cid, where, modality))
    return (None if problems else array), (crs, transform), problems


def _check_values(array: np.ndarray, cid: str, where: str, modality: str) -> list[Problem]:
    if modality == chips.LABEL:
        bad = np.setdiff1d(np.unique(array), np.fromiter(VALID_LABELS, dtype=np.int64))
        if bad.size:
            return [Problem(cid, where, f"label values {bad[:10].tolist()} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}")]
        return []
    if np.issubdtype(array.dtype, np.floating):
        n_nan = int(np.isnan(array).sum())
        if n_nan:
            return [Problem(cid, where, f"{n_nan} NaN values in {modality}; fill or mask them before building chips")]
    return []


def validate_dataset(data_dir: Path, progress=None) -> list[Problem]:
    """Check the manifest, the index and every chip; return every problem found."""
    data_dir = Path(data_dir)
    try:
        spec = chips.DatasetSpec.read(data_dir)
        index = chips.read_index(data_dir)
    except (OSError, ValueError) as err:
        return [Problem(None, None, str(err))]
    except Exception as err:  # a corrupt parquet raises arrow-specific errors
        return [Problem(None, str(data_dir / chips.INDEX_FILE), f"unreadable chip index ({err})")]
    problems = _check_index(index, spec)
    if any(p.message.startswith(MISSING_COLUMNS) for p in problems):
        return problems  # every chip would repeat the same complaint
    for i, record in enumerate(index.to_dict("records")):
        problems.extend(inspect_chip(data_dir, spec, record)[1])
        if progress and (i + 1) % 50 == 0:
            progress(f"checked {i + 1}/{len(index)} chips")
    problems.extend(_orphan_files(data_dir, spec, set(index["chip_id"])))
    return problems


def _check_index(index, spec: chips.DatasetSpec) -> list[Problem]:
    where = chips.INDEX_FILE
    missing = [c for c in (*REQUIRED_COLUMNS, *map(chips.path_column, spec.all_modalities())) if c not in index.columns]
    if missing:
        return [Problem(None, where, f"{MISSING_COLUMNS} {missing}")]
    problems = [Problem(cid, where, "chip id appears more than once in the index")
                for cid in sorted(set(index.loc[index["chip_id"].duplicated(), "chip_id"]))]
    problems += [Problem(str(cid), where, f"unknown split {split!r}; expected one of {list(chips.SPLITS)}")
                 for cid, split in zip(index["chip_id"], index["split"]) if split not in chips.SPLITS]
    problems += [Problem(None, where, f"split {split!r} has no chips") for split in chips.SPLITS
                 if not (index["split"] == split).any()]
    problems += _repeated_dates(index, spec)
    splits_per_parent = index.groupby("parent_id")["split"].nunique()
    problems += [Problem(None, where, f"parent {parent} has chips in several splits (leaks between train and test)")
                 for parent in splits_per_parent[splits_per_parent > 1].index]
    return problems


def _repeated_dates(index, spec: chips.DatasetSpec) -> list[Problem]:
    """A dataset built with ``temporal_mode: distinct`` must hold T different S2 dates, and T different S1 dates."""
    if spec.source.get("temporal_mode") != "distinct":
        return []
    problems = []
    for column in [c for c in ("dates", "s1_dates") if c in index.columns]:
        for cid, dates in zip(index["chip_id"], index[column]):
            listed = chips.split_dates(dates)
            if len(set(listed)) < len(listed):
                problems.append(Problem(str(cid), chips.INDEX_FILE, f"{column} {'|'.join(listed)} repeat a date, but "
                                        "dataset.json says temporal_mode distinct; rebuild from a multi-date source"))
    return problems


def _orphan_files(data_dir: Path, spec: chips.DatasetSpec, indexed: set[str]) -> list[Problem]:
    problems = []
    for modality in spec.all_modalities():
        suffix = f"_{modality}.tif"
        for path in sorted((data_dir / modality).glob(f"*{suffix}")):
            cid = path.name[: -len(suffix)]
            if cid not in indexed:
                problems.append(Problem(cid, str(path), "file has no row in the chip index; delete it or rebuild the index"))
    return problems
