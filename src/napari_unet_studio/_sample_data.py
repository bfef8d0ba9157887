"""Sample images with their ground-truth labels, read from the installed package.

Returns napari layer-data tuples; this module does not import napari.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

SAMPLES = {
    "nuclei": ("nuclei.png", "nuclei_labels.png", "Fluorescence nuclei"),
    "em": ("em.png", "em_labels.png", "EM neural tissue"),
}


def sample_path(filename: str):
    """A path-like to a file of the packaged ``sample_data`` folder."""
    return resources.files("napari_unet_studio").joinpath("sample_data", filename)


def load_sample(key: str) -> tuple[np.ndarray, np.ndarray]:
    """The image and its ground-truth instance labels of sample ``key``."""
    import imageio.v3 as iio

    image_file, labels_file, _ = SAMPLES[key]
    with resources.as_file(sample_path(image_file)) as p:
        image = iio.imread(p)
    with resources.as_file(sample_path(labels_file)) as p:
        labels = iio.imread(p)
    return image, labels


def _layers(key: str) -> list[tuple]:
    image, labels = load_sample(key)
    name = SAMPLES[key][2]
    return [(image, {"name": name}, "image"), (labels, {"name": f"{name} ground truth", "opacity": 0.5}, "labels")]


def nuclei() -> list[tuple]:
    """Fluorescence nuclei (DSB 2018) with ground-truth labels."""
    return _layers("nuclei")


def em() -> list[tuple]:
    """EM neural tissue (ISBI 2012) with ground-truth cell labels."""
    return _layers("em")
