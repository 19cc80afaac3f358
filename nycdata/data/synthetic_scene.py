"""The synthetic scene model both generators share: class signatures per modality and blob-shaped label maps.

:mod:`nycdata.data.fixture` (finished chips) and :mod:`nycdata.sources.synthetic`
(raw source files for the builder) draw their data from these, so both are
learnable the same way: labels are spatially coherent blobs and every input
modality carries a class-dependent signature (water: dark in NIR and radar;
vegetation: bright NIR; developed: bright, flat radar; bare: bright SWIR).
"""

from __future__ import annotations

import numpy as np

from nycdata.data.classes import NUM_CLASSES

# Mean surface reflectance x 10000 per class for B01..B12 (no B10).
S2_SIGNATURES = np.array([
    [300, 420, 520, 360, 300, 260, 230, 210, 190, 130, 90, 70],             # water
    [1200, 1300, 1420, 1520, 1620, 1700, 1750, 1800, 1820, 1700, 2050, 1900],  # developed
    [300, 420, 620, 420, 950, 2500, 3000, 3200, 3300, 3250, 1600, 820],     # trees
    [420, 520, 820, 720, 1250, 2300, 2600, 2800, 2900, 2850, 2400, 1550],   # herbaceous
    [1400, 1600, 1900, 2200, 2400, 2600, 2700, 2800, 2900, 2800, 3300, 2900],  # other (bare)
], dtype=np.float64)
S2_RED_EDGE_TO_NIR = slice(4, 10)  # bands that follow the vegetation season
# Mean backscatter in dB (VV, VH) per class.
S1_SIGNATURES_DB = np.array([[-21.0, -27.5], [-5.5, -12.0], [-8.5, -14.5], [-11.5, -18.5], [-13.0, -20.5]])
DEM_OFFSET_M = np.array([-4.0, 2.0, 6.0, 1.0, 0.0])  # relative to each parent's smooth terrain


def smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape``, standardised to mean 0 and standard deviation 1."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def blob_labels(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Argmax of smooth random class fields: blobs tens of pixels across."""
    prior = np.array([0.0, 0.35, 0.1, 0.0, -0.3])
    sigma = max(3.0, min(shape) / 10)
    fields = np.stack([smooth_field(shape, sigma, rng) + prior[k] for k in range(NUM_CLASSES)])
    return fields.argmax(axis=0).astype(np.uint8)
