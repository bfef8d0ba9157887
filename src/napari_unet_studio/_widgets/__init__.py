"""napari dock widgets: thin Qt layers over the Qt-free core (no numerics here)."""
