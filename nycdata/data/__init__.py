"""Data layer: everything on disk about chips (format, classes, index, normalisation statistics, the Dataset and
DataModule, validation, the synthetic fixture, thought files, metrics of label maps). Imports only the core."""
