"""Sources -> chips: put every modality on each parent's S2 10 m grid, fix the original's defects, cut, split.

Reads a sources manifest (``sources.csv``, written by a fetcher -- :mod:`nycdata.sources.stac`,
:mod:`nycdata.sources.majortom`, :mod:`nycdata.sources.worldcover` -- or by hand; columns ``parent_id,
modality, date, band, path, cloud_cover, processing_baseline, product_id``; read with
:func:`nycdata.sources.manifest.manifest_frame`) and writes the chip format of
:mod:`nycdata.data.chips`, then validates it. What it fixes, and records per chip:

- T dates per parent: ``distinct`` cloud-filtered S2 dates spread over the
  season, each with its own S1 date (the original copied one scene T times;
  ``replicate`` keeps that, explicitly -- Major-TOM Core has one date per cell);
- S1 linear power -> dB (the original normalised linear values with dB
  statistics; ``s1_convert_to_db: false`` keeps that); zeros/NaN are nodata,
  filled with the pretraining mean;
- every S2 scene is brought to one radiometric convention,
  ``s2_offset_convention``: the +1000 BOA offset of processing baseline >= 04.00
  removed (``without_offset``) or added to older scenes (``with_offset``), or
  left as delivered (the original); baseline 99.99 (reprocessed) scenes are
  judged from their darkest pixels;
- a missing DEM is an error unless ``missing_dem`` is ``mean`` (flagged) or
  ``zero`` (the original's silent zero fill, flagged too);
- WorldCover -> the 5 classes of :mod:`nycdata.data.classes` (nearest resampling).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from nycdata import console
from nycdata.data import chips
from nycdata.data.chips import TERRAMIND_V1_STATS
from nycdata.data.classes import IGNORE_INDEX, class_counts, worldcover_to_class
from nycdata.data.validate import validate_dataset
from nycdata.io import replace_dir_atomically
from nycdata.params import resolve_path
from nycdata.sources.manifest import (ALL_PARENTS, REPROCESSED_BASELINE, S2_OFFSET, SourceError, manifest_frame,
                                      needs_offset)
from nycdata.sources.synthetic import SyntheticSourcesConfig, make_sources

S2_CONVENTIONS = ("without_offset", "with_offset", "as_delivered")
MISSING_DEM_CHOICES = ("error", "mean", "zero")
SPLIT_METHODS = ("permutation", "original")
# Darkest valid DN (0.5th percentile, darkest of the 10/20 m bands) of a scene: water and shadow sit near 0 without the
# offset and near 1000 with it. Between the two thresholds a scene is refused rather than guessed.
DARK_PERCENTILE = 0.5
DARK_WITHOUT_OFFSET_MAX, DARK_WITH_OFFSET_MIN = 500.0, 800.0
LABEL_YEAR = 2021  # ESA WorldCover 2021 v200


@dataclass(frozen=True)
class Grid:
    crs: object
    transform: object
    height: int
    width: int




def choose_dates(s2_rows: pd.DataFrame, timesteps: int, mode: str, max_cloud: float, parent: str) -> list[str]:
    """T S2 dates of one parent: distinct and spread over the season, or one date replicated."""
    cloud = pd.to_numeric(s2_rows["cloud_cover"], errors="coerce").fillna(0.0)
    dates = sorted(set(s2_rows.loc[cloud <= max_cloud, "date"]))
    if not dates:
        raise SourceError(f"parent {parent}: no S2 scene with cloud cover <= {max_cloud} %")
    if mode == "replicate":
        return [dates[0]] * timesteps
    if mode != "distinct":
        raise SourceError(f"temporal_mode {mode!r} unknown; choose distinct or replicate")
    if len(dates) < timesteps:
        raise SourceError(f"parent {parent}: {len(dates)} cloud-filtered S2 dates, {timesteps} timesteps needed. Major-TOM "
                          "Core holds one date per cell: build it with temporal_mode: replicate (params/original.yaml), "
                          "or fetch a multi-date series with `python -m nycdata fetch stac`")
    picks = np.unique(np.round(np.linspace(0, len(dates) - 1, timesteps)).astype(int))
    return [dates[i] for i in picks]


def darkest_dn(stack: np.ndarray) -> float:
    """The scene's dark-object level: the lowest 0.5th percentile of valid (> 0) DNs over the 10 and 20 m bands."""
    bands = [chips.S2L2A_BANDS.index(b) for b in ("B02", "B03", "B04", "B08", "B11", "B12")]
    levels = [np.percentile(v[v > 0], DARK_PERCENTILE) for v in (stack[i][np.isfinite(stack[i])] for i in bands) if (v > 0).any()]
    return float(min(levels)) if levels else float("nan")


def offset_from_pixels(stack: np.ndarray, where: str) -> bool:
    """Whether a scene's DNs carry the +1000 offset, judged from its darkest pixels; refused when unclear."""
    dark = darkest_dn(stack)
    if dark <= DARK_WITHOUT_OFFSET_MAX:
        return False
    if dark >= DARK_WITH_OFFSET_MIN:
        return True
    raise SourceError(f"{where}: processing baseline 99.99 (reprocessed) and its darkest pixels sit at {dark:.0f} DN, "
                      f"between {DARK_WITHOUT_OFFSET_MAX:.0f} (no offset) and {DARK_WITH_OFFSET_MIN:.0f} (+1000 offset): "
                      "cannot tell whether the offset is present. Check the product's BOA_ADD_OFFSET and write 03.00 "
                      "(absent) or 04.00 (present) as its processing_baseline in sources.csv, or drop the scene")


def _reproject(path: str, grid: Grid, resampling: str, band: int | None = None, dst_nodata=None) -> np.ndarray:
    """Bands of ``path`` (all, or one) warped onto ``grid`` as float64 (NaN where the source has nodata or no data)."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    with rasterio.open(path) as src:
        indexes = [band] if band else list(range(1, src.count + 1))
        out = np.full((len(indexes), grid.height, grid.width), np.nan)
        for i, index in enumerate(indexes):
            reproject(rasterio.band(src, index), out[i], src_nodata=src.nodata, dst_transform=grid.transform,
                      dst_crs=grid.crs, dst_nodata=np.nan if dst_nodata is None else dst_nodata,
                      resampling=getattr(Resampling, resampling))
    return out


def reference_grid(s2_rows: pd.DataFrame) -> Grid:
    """The parent's S2 10 m grid: the B02 file (per-band sources) or the stacked file of its first date."""
    import rasterio

    rows = s2_rows.sort_values("date")
    ten_m = rows[rows["band"].isin(["", "B02"])]
    with rasterio.open(ten_m.iloc[0]["file"]) as src:
        return Grid(src.crs, src.transform, src.height, src.width)


@dataclass(frozen=True)
class OffsetDecision:
    """What one S2 scene held and what was done to bring it to ``s2_offset_convention``."""

    delivered: str  # "present" or "absent", with " (pixels)" when judged from the darkest pixels
    action: str  # "added", "removed" or "" (nothing)


def harmonise(stack: np.ndarray, date: str, baseline: str, convention: str, where: str) -> tuple[np.ndarray, OffsetDecision]:
    """Bring one scene's DNs to ``convention`` (see :data:`S2_CONVENTIONS`); nodata (0) stays 0."""
    if convention not in S2_CONVENTIONS:
        raise SourceError(f"s2_offset_convention {convention!r} unknown; choose one of {list(S2_CONVENTIONS)}")
    if baseline == REPROCESSED_BASELINE:
        present, delivered_how = offset_from_pixels(stack, where), " (pixels)"
    else:
        present, delivered_how = not needs_offset(date, baseline), ""
    delivered = ("present" if present else "absent") + delivered_how
    valid = stack > 0
    if convention == "with_offset" and not present:
        return np.where(valid, stack + S2_OFFSET, 0.0), OffsetDecision(delivered, "added")
    if convention == "without_offset" and present:
        return np.where(valid, np.maximum(stack - S2_OFFSET, 0.0), 0.0), OffsetDecision(delivered, "removed")
    return stack, OffsetDecision(delivered, "")


def s2_stack(rows: pd.DataFrame, grid: Grid, convention: str) -> tuple[np.ndarray, OffsetDecision]:
    """(12, H, W) DNs of one date on ``grid`` (bilinear for coarser bands), in ``convention``, and what was done."""
    if (rows["band"] == "").any():
        stack = _reproject(rows[rows["band"] == ""].iloc[0]["file"], grid, "bilinear")
    else:
        by_band = rows.set_index("band")
        missing = [b for b in chips.S2L2A_BANDS if b not in by_band.index]
        if missing:
            raise SourceError(f"parent {rows.iloc[0]['parent_id']} date {rows.iloc[0]['date']}: S2 bands {missing} missing")
        stack = np.concatenate([_reproject(by_band.loc[b, "file"], grid, "bilinear") for b in chips.S2L2A_BANDS])
    first = rows.iloc[0]
    where = f"parent {first['parent_id']} S2 {first['date']} ({first['product_id'] or first['file']})"
    stack, decision = harmonise(np.nan_to_num(stack, nan=0.0), first["date"], first["processing_baseline"], convention, where)
    return stack, decision


def s1_db(path: str, grid: Grid, declared: str, where: str, convert: bool = True) -> tuple[np.ndarray, float]:
    """(2, H, W) VV/VH in dB on ``grid`` and the nodata fraction; nodata filled with the pretraining mean.

    ``convert=False`` reproduces the original's defect: values stay as stored (linear power), nodata 0."""
    values = _reproject(path, grid, "bilinear")
    valid = np.isfinite(values) & (values != 0)
    if not convert:
        return np.where(valid, values, 0.0), float(1 - valid.all(axis=0).mean())
    scale = declared
    looks_db = np.nanmedian(np.where(valid, values, np.nan)) < 0 if valid.any() else declared == "db"
    if declared == "linear" and looks_db:
        console.warn(f"{where}: declared linear but holds negative values (dB?); used as dB", stacklevel=2)
        scale = "db"
    elif declared == "db" and not looks_db:
        console.warn(f"{where}: declared dB but all values are positive (linear power?); converted to dB", stacklevel=2)
        scale = "linear"
    if scale == "linear":
        valid &= values > 0
        values = 10 * np.log10(np.where(valid, values, 1.0))
    fill = np.array(TERRAMIND_V1_STATS["S1RTC"][0])[:, None, None]
    return np.where(valid, values, fill), float(1 - valid.all(axis=0).mean())


def cut_windows(grid: Grid, size: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(grid.height // size) for c in range(grid.width // size)]


def grouped_split(parents: list[str], fractions, seed: int, method: str = "permutation") -> dict[str, str]:
    """Whole parents to train/val/test, about ``fractions`` of parents each, at least one each.

    ``method="original"`` is the original script's split, kept to reproduce its 224/48/64 chips: sorted parent
    ids shuffled by ``random.Random(seed)``, ``int(0.7 n)`` train, ``int(0.15 n)`` val, the rest test."""
    if len(parents) < 3:
        raise SourceError(f"{len(parents)} parents: a grouped train/val/test split needs at least 3")
    if method == "original":
        order = sorted(parents)
        random.Random(seed).shuffle(order)
        n_train, n_val = int(fractions[0] * len(order)), int(fractions[1] * len(order))
        if min(n_train, n_val, len(order) - n_train - n_val) == 0:
            raise SourceError(f"split_method original gives {n_train}/{n_val}/{len(order) - n_train - n_val} of "
                              f"{len(order)} parents to train/val/test: a split would be empty; use split_method: "
                              "permutation (at least one parent each) or more parents")
        return {p: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, p in enumerate(order)}
    if method != "permutation":
        raise SourceError(f"split_method {method!r} unknown; choose one of {list(SPLIT_METHODS)}")
    order = [parents[i] for i in np.random.default_rng(seed).permutation(len(parents))]
    return dict(zip(order, chips.split_labels(len(parents), fractions)))


@dataclass
class ParentStack:
    """Every modality of one parent on its S2 grid, with what was fixed."""

    parent: str
    grid: Grid
    dates: list[str]
    s1_dates: list[str]
    s2: np.ndarray  # (T, 12, H, W)
    s1: np.ndarray  # (T, 2, H, W) dB
    dem: np.ndarray  # (1, H, W)
    label: np.ndarray  # (H, W) uint8
    fixes: list[str]
    s1_nodata: float
    product_ids: list[str]
    cloud_cover: list[float]
    s2_offset: list[str]  # per date: how the scene was delivered (present / absent, "(pixels)" when judged from pixels)


def assemble_parent(manifest: pd.DataFrame, parent: str, params: Mapping, log: Callable[[str], None]) -> ParentStack:
    rows = manifest[manifest["parent_id"] == parent]
    s2_rows = rows[rows["modality"] == "S2L2A"]
    if s2_rows.empty:
        raise SourceError(f"parent {parent}: no S2L2A rows in the manifest")
    grid = reference_grid(s2_rows)
    dates = choose_dates(s2_rows, params["timesteps"], params["temporal_mode"], params["max_cloud_cover"], parent)
    fixes = ["temporal_replicate"] if params["temporal_mode"] == "replicate" else []
    stacks, decisions = zip(*(s2_stack(s2_rows[s2_rows["date"] == d], grid, params["s2_offset_convention"]) for d in dates))
    fixes += [f"s2_offset_{o.action}_{d}" for d, o in zip(dates, decisions) if o.action]
    s1, s1_dates, nodata = _s1_series(rows, parent, dates, grid, params)
    if not params["s1_convert_to_db"]:
        fixes.append("s1_linear_kept")
    elif params["s1_input_scale"] == "linear":
        fixes.append("s1_db")
    dem, dem_fix = _dem(rows, manifest, parent, grid, params)
    label = _labels(manifest, parent, grid)
    per_date = s2_rows.drop_duplicates("date").set_index("date")
    log(f"parent {parent}: {grid.width}x{grid.height} px, dates {', '.join(dates)}, fixes {fixes + dem_fix or 'none'}")
    return ParentStack(parent, grid, dates, s1_dates, np.stack(stacks), s1, dem, label, fixes + dem_fix, nodata,
                       [per_date.loc[d, "product_id"] for d in dates],
                       [float(pd.to_numeric(per_date.loc[d, "cloud_cover"], errors="coerce") or 0.0) for d in dates],
                       [o.delivered for o in decisions])


def _s1_series(rows, parent, dates, grid, params):
    s1_rows = rows[rows["modality"] == "S1RTC"]
    if s1_rows.empty:
        raise SourceError(f"parent {parent}: no S1RTC rows in the manifest")
    nearest = match_s1_dates(dates, sorted(set(s1_rows["date"])), distinct=params["temporal_mode"] == "distinct",
                             parent=parent)
    series, nodata = [], []
    for date in nearest:
        file = s1_rows[s1_rows["date"] == date].iloc[0]["file"]
        values, missing = s1_db(file, grid, params["s1_input_scale"], file, convert=params["s1_convert_to_db"])
        series.append(values)
        nodata.append(missing)
    return np.stack(series), nearest, float(np.mean(nodata))


def _days(a: str, b: str) -> int:
    return abs((dt.date.fromisoformat(a) - dt.date.fromisoformat(b)).days)


def match_s1_dates(s2_dates: list[str], s1_dates: list[str], distinct: bool, parent: str) -> list[str]:
    """The S1 date for each S2 date: the nearest one; with ``distinct``, nearest among those not yet taken
    (closest pairs first), so T timesteps get T different radar scenes."""
    if not distinct:
        return [min(s1_dates, key=lambda a: _days(a, d)) for d in s2_dates]
    if len(set(s1_dates)) < len(set(s2_dates)):
        raise SourceError(f"parent {parent}: {len(set(s1_dates))} S1 dates for {len(set(s2_dates))} distinct S2 dates; "
                          "fetch S1 per S2 date (`python -m nycdata fetch stac`) or use temporal_mode: replicate")
    pairs = sorted((_days(a, d), i, a) for i, d in enumerate(s2_dates) for a in s1_dates)
    chosen: dict[int, str] = {}
    for _, i, a in pairs:
        if i not in chosen and a not in chosen.values():
            chosen[i] = a
    return [chosen[i] for i in range(len(s2_dates))]


def label_gap_days(dates: list[str]) -> int:
    """Days from the farthest image date to the label year (0 when every date lies in it)."""
    first, last = dt.date(LABEL_YEAR, 1, 1), dt.date(LABEL_YEAR, 12, 31)
    gaps = [max((first - d).days, (d - last).days, 0) for d in map(dt.date.fromisoformat, dates)]
    return max(gaps, default=0)


def _dem(rows, manifest, parent, grid, params):
    dem_rows = rows[rows["modality"] == "DEM"]
    if dem_rows.empty:
        how = params["missing_dem"]
        if how not in MISSING_DEM_CHOICES:
            raise SourceError(f"missing_dem {how!r} unknown; choose one of {list(MISSING_DEM_CHOICES)}")
        if how == "error":
            raise SourceError(f"parent {parent}: no DEM in the manifest. Fetch it, or set missing_dem: mean to use a "
                              "constant DEM (pretraining mean) flagged as dem_missing in the index")
        fill = TERRAMIND_V1_STATS["DEM"][0][0] if how == "mean" else 0.0
        return np.full((1, grid.height, grid.width), fill), ["dem_missing"] + (["dem_zero_filled"] if how == "zero" else [])
    dem = _reproject(dem_rows.iloc[0]["file"], grid, "bilinear")
    if np.isnan(dem).any():
        raise SourceError(f"parent {parent}: DEM {dem_rows.iloc[0]['file']} does not cover the parent's grid")
    return dem, []


def _labels(manifest, parent, grid) -> np.ndarray:
    rows = manifest[(manifest["modality"] == "WORLDCOVER") & manifest["parent_id"].isin([parent, ALL_PARENTS])]
    if rows.empty:
        raise SourceError(f"parent {parent}: no WORLDCOVER row (for the parent or '*')")
    codes = _reproject(rows.iloc[0]["file"], grid, "nearest", dst_nodata=0)[0]
    return worldcover_to_class(np.nan_to_num(codes, nan=0).astype(np.int64))


def write_parent_chips(out_dir: Path, stack: ParentStack, size: int, min_valid: float) -> tuple[list[dict], int]:
    """Cut non-overlapping chips; drop those with too few valid labels; return index rows and the drop count."""
    from rasterio.windows import Window, transform as window_transform
    from shapely.geometry import box

    rows, dropped, T = [], 0, len(stack.dates)
    for r, c in cut_windows(stack.grid, size):
        window = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
        label = stack.label[window]
        if (label != IGNORE_INDEX).mean() < min_valid:
            dropped += 1
            continue
        transform = window_transform(Window(c * size, r * size, size, size), stack.grid.transform)
        cid = chips.chip_id(stack.parent, r, c)
        arrays = {"S2L2A": np.clip(np.rint(stack.s2[:, :, window[0], window[1]]), 0, 65535).astype(np.uint16).reshape(T * 12, size, size),
                  "S1RTC": stack.s1[:, :, window[0], window[1]].astype(np.float32).reshape(T * 2, size, size),
                  "DEM": stack.dem[:, window[0], window[1]].astype(np.float32), chips.LABEL: label[None]}
        row = {"chip_id": cid, "parent_id": stack.parent, "row": r, "col": c, "crs": stack.grid.crs.to_string(),
               "dates": "|".join(stack.dates), "s1_dates": "|".join(stack.s1_dates),
               "product_ids": "|".join(stack.product_ids), "cloud_cover": "|".join(f"{v:g}" for v in stack.cloud_cover),
               "s2_offset": "|".join(stack.s2_offset), "label_gap_days": label_gap_days(stack.dates),
               "s1_gap_days": max(map(_days, stack.dates, stack.s1_dates), default=0),
               "fixes": "|".join(stack.fixes), "dem_missing": "dem_missing" in stack.fixes,
               "s1_nodata_fraction": stack.s1_nodata, "label_nodata_fraction": float((label == IGNORE_INDEX).mean())}
        for modality, array in arrays.items():
            rel = chips.chip_relpath(cid, modality)
            chips.write_raster(out_dir / rel, array, stack.grid.crs, transform, chips.MODALITIES[modality].band_descriptions(T))
            row[chips.path_column(modality)] = rel
        row.update({f"count_{k}": v for k, v in class_counts(label).items()})
        left, top = transform.c, transform.f
        row["geometry"] = box(left, top + size * transform.e, left + size * transform.a, top)
        rows.append(row)
    return rows, dropped


def _assign_splits(index: pd.DataFrame, params: Mapping, log) -> pd.DataFrame:
    if not params["test_chips_file"]:
        return index.assign(split=index["parent_id"].map(grouped_split(
            sorted(set(index["parent_id"])), params["split_fractions"], params["split_seed"], params["split_method"])))
    listed = {line.strip() for line in resolve_path(params["test_chips_file"]).read_text().splitlines() if line.strip()}
    unknown = listed - set(index["chip_id"])
    if unknown:
        log(f"warning: {len(unknown)} listed test chips were not built, e.g. {sorted(unknown)[0]}")
    test_parents = set(index.loc[index["chip_id"].isin(listed), "parent_id"])
    leaking = index["parent_id"].isin(test_parents) & ~index["chip_id"].isin(listed)
    if leaking.any():
        log(f"dropping {int(leaking.sum())} chips of test parents that the list leaves out (they would leak)")
    index = index.loc[~leaking].copy()
    rest = sorted(set(index["parent_id"]) - test_parents)
    n_val = max(1, round(params["split_fractions"][1] / sum(params["split_fractions"][:2]) * len(rest)))
    order = [rest[i] for i in np.random.default_rng(params["split_seed"]).permutation(len(rest))]
    splits = {p: ("val" if i < n_val else "train") for i, p in enumerate(order)} | {p: "test" for p in test_parents}
    return index.assign(split=index["parent_id"].map(splits))


def build_dataset(manifest_path: Path, out_dir: Path, params: Mapping, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Build the chip dataset from a sources manifest into ``out_dir`` and validate it; nothing half-written remains."""
    import geopandas as gpd

    manifest = manifest_frame(manifest_path)
    parents = sorted(p for p in set(manifest["parent_id"]) if p != ALL_PARENTS)
    size = params["chip_size"]
    # a line per parent already says where the build is; the bar adds the ETA (and a widget in JupyterLab)
    progress = console.progress(len(parents), "dataset build", unit="parents", log=log, final=False)
    with replace_dir_atomically(Path(out_dir), overwrite=overwrite) as tmp:
        frames = []
        with progress:
            for i, parent in enumerate(parents, start=1):
                stack = assemble_parent(manifest, parent, params, log)
                rows, dropped = write_parent_chips(tmp, stack, size, params["min_valid_fraction"])
                log(f"[{i}/{len(parents)}] {parent}: {len(rows)} chips, {dropped} dropped (< {params['min_valid_fraction']:.0%} valid labels)")
                if rows:
                    frames.append(gpd.GeoDataFrame(rows, geometry="geometry", crs=stack.grid.crs).to_crs(chips.INDEX_CRS))
                progress.update()
        if not frames:
            raise SourceError(f"{manifest_path}: no chip survived; check the chip_size and min_valid_fraction parameters")
        index = _assign_splits(pd.concat(frames, ignore_index=True), params, log)
        chips.write_index(tmp, gpd.GeoDataFrame(index, geometry="geometry", crs=chips.INDEX_CRS))
        build_keys = ("chip_size", "timesteps", "temporal_mode", "max_cloud_cover", "s1_input_scale", "s1_convert_to_db",
                      "s2_offset_convention", "missing_dem", "min_valid_fraction", "split_fractions", "split_seed",
                      "split_method", "test_chips_file")
        chips.DatasetSpec(chip_size=size, timesteps=params["timesteps"], source={
            "generator": "nycdata.sources.build", "manifest": str(manifest_path), **{k: params[k] for k in build_keys}}).write(tmp)
        problems = validate_dataset(tmp)
        if problems:
            raise SourceError("the built dataset failed validation:\n  " + "\n  ".join(map(str, problems[:20])))
    log(f"built {len(index)} chips from {len(parents)} parents into {out_dir}")
    return Path(out_dir)


def s1_conversion_example(manifest: pd.DataFrame, parent: str, params: Mapping) -> dict:
    """VV of the parent's first S1 scene before (as stored) and after the dB conversion, for notebook 00."""
    s2_rows = manifest[(manifest["parent_id"] == parent) & (manifest["modality"] == "S2L2A")]
    row = manifest[(manifest["parent_id"] == parent) & (manifest["modality"] == "S1RTC")].sort_values("date").iloc[0]
    grid = reference_grid(s2_rows)
    raw = _reproject(row["file"], grid, "bilinear")[0]
    converted, _ = s1_db(row["file"], grid, params["s1_input_scale"], row["file"], convert=params["s1_convert_to_db"])
    return {"date": row["date"], "before": raw, "after": converted[0]}


def s2_harmonisation_example(manifest: pd.DataFrame, parent: str, params: Mapping) -> dict | None:
    """B04 of the parent's first scene that ``s2_offset_convention`` changes, before and after, or None if none."""
    rows = manifest[(manifest["parent_id"] == parent) & (manifest["modality"] == "S2L2A")]
    grid = reference_grid(rows)
    for date in sorted(set(rows["date"])):
        scene = rows[rows["date"] == date]
        before, _ = s2_stack(scene, grid, "as_delivered")  # read once; the convention is applied to it in memory
        after, decision = harmonise(before, date, scene.iloc[0]["processing_baseline"], params["s2_offset_convention"],
                                    f"parent {parent} S2 {date}")
        if decision.action:
            return {"date": date, "before": before[3], "after": after[3], "action": decision.action}
    return None


def ensure_sources(params: Mapping, log: Callable[[str], None] = print) -> Path:
    """The sources manifest of ``params``; synthetic sources are generated there first when asked for."""
    manifest = resolve_path(params["sources_manifest"])
    if params["synthetic_sources"] and not manifest.is_file():

        # deliberately unlike tests/test_build.py's sources: stacked S2, smaller parents, projected DEM and labels
        make_sources(manifest.parent, SyntheticSourcesConfig(
            parents=4, parent_size_px=128, s2_layout="stacked", dem_crs="EPSG:32618", worldcover_crs="EPSG:32618",
            seed=params["fixture_seed"]))
        log(f"generated synthetic sources at {manifest.parent}")
    if not manifest.is_file():
        raise SourceError(f"sources manifest {manifest} not found: fetch the sources first "
                          "(`python -m nycdata fetch majortom DIR` and `... fetch worldcover DIR`, see README)")
    return manifest
