"""The 5-class NYC land-cover table: the one source of truth for labels.

Class order is the original training script's (the model cards disagree with
it; the script is authoritative). Labels on disk are uint8 with
:data:`IGNORE_INDEX` for pixels that count in no metric and no loss.

Every label writer, metric and plot in ``nycdata`` reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255
"""Label value for pixels excluded from loss and metrics (outside 0..4)."""


@dataclass(frozen=True)
class LandCoverClass:
    index: int
    name: str
    colour: str  # hex RGB, used by every plot
    worldcover_codes: tuple[int, ...]


CLASSES: tuple[LandCoverClass, ...] = (
    LandCoverClass(0, "water", "#1f63c6", (80, 90, 95)),
    LandCoverClass(1, "developed", "#d7301f", (50,)),
    LandCoverClass(2, "trees", "#1a7a2e", (10, 20)),
    LandCoverClass(3, "herbaceous", "#a6d96a", (30, 40)),
    LandCoverClass(4, "other", "#b08d57", (60, 70, 100)),
)

NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
CLASS_COLOURS: tuple[str, ...] = tuple(c.colour for c in CLASSES)
IGNORE_COLOUR = "#000000"

# ESA WorldCover 2021 v200 legend; every code maps to a class above or to ignore
# (0 = no data).
WORLDCOVER_CODES: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)


def _worldcover_lookup() -> np.ndarray:
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for cls in CLASSES:
        lookup[list(cls.worldcover_codes)] = cls.index
    return lookup


_WORLDCOVER_LOOKUP = _worldcover_lookup()


def worldcover_to_class(codes: np.ndarray) -> np.ndarray:
    """Map ESA WorldCover codes to our class indices (uint8, ignore = 255).

    Codes outside the WorldCover legend (including 0 = no data and anything
    outside 0..255) become :data:`IGNORE_INDEX`.
    """
    codes = np.asarray(codes)
    in_range = (codes >= 0) & (codes <= 255)
    safe = np.where(in_range, codes, 0).astype(np.intp)
    return np.where(in_range, _WORLDCOVER_LOOKUP[safe], IGNORE_INDEX).astype(np.uint8)


def class_counts(label: np.ndarray) -> dict[str, int]:
    """Pixel count per class name, plus ``ignore`` for everything else."""
    label = np.asarray(label)
    counts = {c.name: int((label == c.index).sum()) for c in CLASSES}
    counts["ignore"] = int(label.size - sum(counts.values()))
    return counts


def colormap():
    """A matplotlib ListedColormap + BoundaryNorm for label maps: class k in its colour, ignore in black."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap([*CLASS_COLOURS, IGNORE_COLOUR])
    boundaries = [*np.arange(-0.5, NUM_CLASSES), IGNORE_INDEX + 0.5]
    return cmap, BoundaryNorm(boundaries, cmap.N)


def legend_handles():
    """Legend patches in class order, for ``ax.legend(handles=...)``."""
    from matplotlib.patches import Patch

    return [Patch(facecolor=c.colour, label=f"{c.index} {c.name}") for c in CLASSES]
