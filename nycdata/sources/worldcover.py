"""ESA WorldCover 2021 v200 label tiles (public S3 bucket) -> raw file + one ``sources.csv`` row for every parent.

The manifest row has parent_id ``*``: the label applies to every parent and the
builder clips it to each parent's footprint. Resumable (:func:`nycdata.sources.http.download`
continues a ``.part`` file; a tile on disk is not fetched again); ``dry_run=True``
logs the plan with sizes from HEAD requests and writes nothing. Command::

    python -m nycdata fetch worldcover data/original_sources -f params/original.yaml [--dry-run]
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nycdata.data.chips import NYC_BBOX
from nycdata.sources.common import Log, check_bbox
from nycdata.sources.http import Session, default_session, download, remote_size
from nycdata.sources.manifest import ALL_PARENTS, read_manifest, write_manifest
from nycdata.sources.plan import PlannedFile, fetched_table, plan_table

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
    x0, y0, x1, y1 = check_bbox(bbox)
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

        python -m nycdata fetch worldcover data/original_sources -f params/original.yaml [--dry-run]

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
    bbox = check_bbox(bbox)
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
