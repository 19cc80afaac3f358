"""Thought files: the cached TiM thought ids and the generated LULC maps, as data on disk.

Reading and writing them lives here, so the Dataset reads them without knowing the model; filling them (running
TerraMind's generator) lives in :mod:`nycdata.model.thinking` and :mod:`nycdata.model.generated`.

* Cached thoughts: ``<run>/thought_cache/<online variant>/<chip_id>.npy``, ``[8 D4 transforms, samples, T, h, w]``
  int16 token ids (one per 16 x 16 patch), and ``cache.json`` (identity, samples) once finished.
* Generated LULC (``tim_input``): ``<run>/generated_lulc/<chip_id>_LULC.tif``, T bands of ESRI classes 0..9 on the
  chip's grid, and ``generation.json`` once finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError

from nycdata.data import chips
from nycdata.data.chips import PATCH_SIZE
from nycdata.runs import RunLayout

THOUGHTS_KEY = "THOUGHTS"  # the batch key the cached ids travel under
CACHE_DONE_FILE = "cache.json"
GENERATED_DONE_FILE = "generation.json"
LULC_CLASSES = 10  # ESRI / TerraMind LULC classes


def cache_root(params: Mapping, online: str) -> Path:
    """The thought cache of the online TiM variant ``online`` (shared by its ``*_cached`` twin's seeds and folds)."""
    return RunLayout.of(params).thought_cache(online)


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids ``[..., h, w]`` -> float map ``[..., 16h, 16w]``, each id over its patch.

    The ids travel through terratorch like an image modality (padded, temporally folded, shaped like the
    inputs), so the backbone receives exactly one id per image patch. float32 holds the ids (< 2**24) exactly.
    """
    return tokens.float().repeat_interleave(PATCH_SIZE, dim=-2).repeat_interleave(PATCH_SIZE, dim=-1)


def write_thoughts(root: Path, chip: str, ids: np.ndarray) -> None:
    np.save(Path(root) / f"{chip}.npy", ids)


def cached_sample_count(root: Path) -> int:
    """Thought samples per chip and transform in a finished cache."""
    done = Path(root) / CACHE_DONE_FILE
    if not done.is_file():
        raise FileNotFoundError(f"{done} missing: the thought cache at {root} is unfinished; delete it to regenerate")
    return json.loads(done.read_text())["identity"]["samples"]


def read_thoughts(root: Path, chip: str, transform: int, sample: int) -> torch.Tensor:
    """Cached ids of one chip, D4 transform and thought sample, as the map ``[1, T, H, W]`` of :func:`tokens_to_map`."""
    path = Path(root) / f"{chip}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"no cached thoughts for chip {chip} at {path}; delete {root} to regenerate the cache")
    return tokens_to_map(torch.from_numpy(np.load(path)[transform, sample].astype(np.int64)))[None]


def generated_root(params: Mapping) -> Path:
    return RunLayout.of(params).generated_lulc


def generated_path(root: Path, chip: str) -> Path:
    return Path(root) / f"{chip}_LULC.tif"


def write_generated(out_dir: Path, data_root: Path, chip: str, lulc: np.ndarray) -> None:
    """One chip's generated LULC ``[T, H, W]`` uint8 on the chip's own grid."""
    with rasterio.open(Path(data_root) / chips.chip_relpath(chip, chips.LABEL)) as src:
        crs, transform = src.crs, src.transform
    chips.write_raster(generated_path(out_dir, chip), lulc, crs, transform,
                       [f"t{t}_LULC" for t in range(lulc.shape[0])])


def read_generated(root: Path, chip: str, timesteps: int) -> torch.Tensor:
    """One-hot generated LULC ``[10, T, H, W]`` float32, with a clear error when it is missing."""
    path = generated_path(root, chip)
    try:
        with rasterio.open(path) as src:
            classes = torch.from_numpy(src.read().astype(np.int64))
    except (RasterioError, OSError) as err:
        raise FileNotFoundError(f"generated LULC for chip {chip} unreadable at {path} ({err}); delete {root} "
                                "and run the tim_input fine-tune again to regenerate it") from err
    if classes.shape[0] != timesteps:
        raise ValueError(f"{path}: {classes.shape[0]} timesteps, expected {timesteps}")
    return torch.nn.functional.one_hot(classes, LULC_CLASSES).permute(3, 0, 1, 2).float()
