"""nycdata: does TerraMind's Thinking-in-Modalities improve NYC land-cover segmentation?

The importable package behind the notebooks: chip format, fixture, validation,
data loading, models, training, metrics and plots. See README.md.
"""

__version__ = "0.1.0"
