"""The sources manifest: the hand-off between fetching (:mod:`nycdata.sources.fetch`) and building (:mod:`nycdata.sources.build`).

``sources.csv`` has one row per file: ``parent_id`` (``*`` = applies to every
parent, e.g. one WorldCover mosaic), ``modality``, ``date`` (ISO; empty for
DEM and WORLDCOVER), ``band`` (empty when the file holds all bands in the
canonical order), ``path`` (relative to the manifest), and optional
``cloud_cover``, ``processing_baseline``, ``product_id``.
"""

import datetime as dt

from nycdata.data.chips import NYC_BBOX, S1RTC_BANDS, S2L2A_BANDS  # noqa: F401 - NYC_BBOX: the fetchers' default area
MANIFEST_FILE = "sources.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "parent_id", "modality", "date", "band", "path", "cloud_cover", "processing_baseline", "product_id")
ALL_PARENTS = "*"
MODALITY_BANDS: dict[str, tuple[str, ...]] = {"S2L2A": S2L2A_BANDS, "S1RTC": S1RTC_BANDS, "DEM": ("DEM",), "WORLDCOVER": ()}
SOURCE_MODALITIES: tuple[str, ...] = tuple(MODALITY_BANDS)

# S2 L2A processing baseline 04.00 (from 2022-01-25) added a +1000 BOA offset; the builder brings every scene to
# s2_offset_convention.
OFFSET_BASELINE = "04.00"
OFFSET_DATE = dt.date(2022, 1, 25)
