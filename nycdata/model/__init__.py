"""Model layer: building and running TerraMind (variants, the factory, TiM's thoughts, filling thought files,
weights). Imports the core and the data layer only."""
