"""Sources layer: raw sources -> chips (the manifest, HTTP, one module per source, the builder, synthetic sources).
Imports the core and the data layer only."""
