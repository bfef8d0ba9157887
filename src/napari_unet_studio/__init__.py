"""napari-unet-studio: U-Net and U-Net++ segmentation, fine-tuning and overlap-tile inference.

The public API is importable from here, lazily: importing the package loads neither torch nor
Qt, so napari starts fast; the first use of a name imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "UNet": "models",
    "UNetPlusPlus": "models",
    "Geometry": "models",
    "ModelCard": "card",
    "predict": "inference",
    "segment": "inference",
    "segment_on_cluster": "cluster",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "weight_map": "weightmap",
    "elastic_deform": "augment",
    "train": "training",
    "TrainingSession": "training",
    "find_corrections": "corrections",
    "link_slices": "linking",
    "measure": "measurements",
    "Normalization": "normalize",
    "UnetStudioError": "errors",
    "InputError": "errors",
    "ModelFileError": "errors",
    "Cancelled": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # pragma: no cover
    from .augment import elastic_deform
    from .card import ModelCard
    from .checkpoint import load_model, save_model
    from .errors import Cancelled, InputError, ModelFileError, UnetStudioError
    from .models import Geometry, UNet, UNetPlusPlus
    from .inference import predict, segment
    from .cluster import segment_on_cluster
    from .normalize import Normalization
    from .corrections import find_corrections
    from .linking import link_slices
    from .measurements import measure
    from .training import TrainingSession, train
    from .weightmap import weight_map
