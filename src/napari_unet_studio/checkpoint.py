"""Saving and loading models: one ``.safetensors`` file, weights plus a JSON config.

The config (architecture, channels, classes, normalisation, encoding, provenance) sits in the
safetensors metadata under :data:`CONFIG_KEY`. Loading parses a JSON header and raw tensors:
no code from the file is ever executed. A PyTorch ``.pt``/``.pth`` state dict can be imported,
but only through ``torch.load(weights_only=True)``, which refuses pickled objects.
"""

from __future__ import annotations

import json
import os
import pickle
from importlib import resources
from pathlib import Path

import torch

from .errors import ModelFileError
from .io import atomic_write
from .models import ARCHITECTURES, build_model
from .postprocess import check_options

#: Metadata key of the JSON config inside our safetensors files.
CONFIG_KEY = "napari_unet_studio.config"
#: Version of the config layout, stored with every file.
FORMAT_VERSION = 1
#: Name under which the shipped default model is found.
DEFAULT_MODEL = "default"
_DEFAULT_RESOURCE = ("napari_unet_studio", "pretrained", "default.safetensors")


def default_model_path() -> Path:
    """Path of the shipped default model's weight file (it may not exist in a source checkout)."""
    package, *parts = _DEFAULT_RESOURCE
    return Path(str(resources.files(package).joinpath(*parts)))


def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` (weights and config) to one ``.safetensors`` file.

    The file is written under a temporary name and renamed, so an interrupted save never leaves
    a half-written model behind. Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model files end in .safetensors, not {path.suffix or 'nothing'!r}: {path}")
    config = dict(model.config(), format_version=FORMAT_VERSION)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={CONFIG_KEY: json.dumps(config)}))
    return path


def _model_from(config: dict, state: dict, source: str):
    config = {k: v for k, v in config.items() if k != "format_version"}
    if config.get("arch", "unet") not in ARCHITECTURES:
        raise ModelFileError(f"{source}: unknown architecture {config.get('arch')!r}")
    try:
        model = build_model(config)
        check_options(model.encoding, model.postprocess)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: invalid model config ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ModelFileError(f"{source}: weights do not match the config ({detail})") from exc
    return model.eval()


def _load_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path} is not a valid .safetensors file (corrupted or truncated?)") from exc
    if CONFIG_KEY not in metadata:
        raise ModelFileError(
            f"{path} holds no napari-unet-studio config: it is a foreign safetensors file "
            "(import foreign weights from a .pt/.pth state dict with a config)"
        )
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the model config is not valid JSON") from exc
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the model config is not a JSON object")
    if int(config.get("format_version", 1)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer napari-unet-studio (format {config['format_version']})")
    return _model_from(config, state, str(path))


def _load_state_dict_file(path: Path, config: dict | None):
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"refused to load {path}: it holds pickled Python objects, not only tensors (unsafe to unpickle)"
        ) from exc
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable PyTorch state dict (corrupted or foreign?)") from exc
    if isinstance(payload, dict) and "state_dict" in payload and isinstance(payload["state_dict"], dict):
        config = config or payload.get("config")
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors")
    if config is None:
        raise ModelFileError(f"{path} holds weights but no config: pass the architecture as config=...")
    return _model_from(dict(config), payload, str(path))


def load_model(path: str | os.PathLike = DEFAULT_MODEL, *, config: dict | None = None):
    """Load a model saved by :func:`save_model`, the shipped default, or a foreign state dict.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by :func:`save_model`; ``"default"`` for the shipped
        default model; or a ``.pt``/``.pth`` state dict, read with
        ``torch.load(weights_only=True)`` (a dict ``{"state_dict": ..., "config": ...}`` or a
        bare state dict together with ``config``).
    config
        Architecture for a bare ``.pt``/``.pth`` state dict, as returned by ``model.config()``.

    Returns
    -------
    UNet or UNetPlusPlus
        The model on the CPU, in eval mode.

    Raises
    ------
    ModelFileError
        The file is missing, corrupted, foreign, or holds pickled objects.
    """
    if str(path) == DEFAULT_MODEL:
        path = default_model_path()
        if not path.is_file():
            raise ModelFileError("the default model is not included in this installation")
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a model file: {path}")
    if path.suffix in (".pt", ".pth"):
        return _load_state_dict_file(path, config)
    return _load_safetensors(path)
