"""Saving and loading models: one ``.safetensors`` file, weights plus a JSON config.

The config (the network's architecture, channels and classes, and the model card's normalisation,
encoding, post-processing and provenance, :mod:`.card`) sits in the
safetensors metadata under :data:`CONFIG_KEY`, and a SHA-256 of the config and of every tensor's
bytes under :data:`CHECKSUM_KEY`. Loading parses a JSON header and raw tensors: no code from the
file is ever executed. The config is checked against a schema (types and bounded ranges), and a
model too big for this machine is refused, before any tensor is read; then the checksum is
verified and weights that are not finite are refused. Files of format 1 (no checksum) still
load. A PyTorch ``.pt``/``.pth`` state dict can be imported,
but only through ``torch.load(weights_only=True)``, which refuses pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from importlib import resources
from pathlib import Path

import torch

from .errors import ModelFileError
from .io import atomic_write
from . import encodings
from .card import build_model, card_of, model_config
from .models import ARCHITECTURES, build_network

#: Metadata key of the JSON config inside our safetensors files.
CONFIG_KEY = "napari_unet_studio.config"
#: Metadata key of the SHA-256 of the config and the tensors (format 2 and later).
CHECKSUM_KEY = "napari_unet_studio.sha256"
#: Version of the config layout, stored with every file (2: with a checksum).
FORMAT_VERSION = 2
#: Name under which the shipped default model is found.
DEFAULT_MODEL = "default"
_DEFAULT_RESOURCE = ("napari_unet_studio", "pretrained", "default.safetensors")


def default_model_path() -> Path:
    """Path of the shipped default model's weight file (it may not exist in a source checkout)."""
    package, *parts = _DEFAULT_RESOURCE
    return Path(str(resources.files(package).joinpath(*parts)))


def checksum(config_json: str, state: dict) -> str:
    """SHA-256 (hex) of a model's config text and of its tensors (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(config_json.encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model) -> str:
    """SHA-256 (hex) of ``model``'s weights, encoding and U-Net++ level: names one version of a
    model (a run's ``parent``, a block-wise journal's model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([card_of(model).encoding, getattr(model, "prune_level", None)], default=str).encode())
    return digest.hexdigest()


def _check_finite(state: dict, source: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{source}: the weights hold NaN or infinite values ({name})")


def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` (weights, config and their checksum) to one ``.safetensors`` file.

    The file is written under a temporary name and renamed, so an interrupted save never leaves
    a half-written model behind. Weights that are not finite are refused
    (:class:`~.errors.ModelFileError`). Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model files end in .safetensors, not {path.suffix or 'nothing'!r}: {path}")
    config = json.dumps(dict(model_config(model), format_version=FORMAT_VERSION))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _check_finite(state, "refused to save the model")
    metadata = {CONFIG_KEY: config, CHECKSUM_KEY: checksum(config, state)}

    def write(tmp) -> None:
        try:
            save_file(state, tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports I/O failures (a full disk) as its own error
            import re

            found = re.search(r"os error (\d+)", str(exc))
            if found:
                code = int(found.group(1))
                raise OSError(code, os.strerror(code), str(path)) from exc
            raise OSError(f"cannot write {path}: {exc}") from exc

    atomic_write(path, write)
    return path


#: Bounds of the config's numbers: wide enough for any sensible model, narrow enough that a
#: damaged or hostile file cannot ask for absurd sizes.
LIMITS = {"in_channels": (1, 64), "n_classes": (2, 64), "depth": (1, 8), "base_channels": (1, 1024)}
_TYPES = {
    "arch": str, "in_channels": int, "n_classes": int, "depth": int, "base_channels": int, "dropout": float,
    "batch_norm": bool, "normalization": dict, "encoding": str, "postprocess": dict, "provenance": dict,
    "format_version": int, "prune_level": int,
}


def validate_config(config, source: str = "model config") -> dict:
    """Check a model config against the schema (keys, types, bounded ranges); returns it.

    Raises :class:`~.errors.ModelFileError` naming the first wrong entry.
    """
    if not isinstance(config, dict):
        raise ModelFileError(f"{source}: the model config is not a JSON object")
    for key, value in config.items():
        kind = _TYPES.get(key)
        if kind is None:
            raise ModelFileError(f"{source}: unknown config entry {key!r}")
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok and not (value is None and key in ("normalization", "postprocess", "provenance", "encoding", "prune_level")):
            raise ModelFileError(f"{source}: config entry {key!r} must be {kind.__name__}, got {value!r:.40}")
    if config.get("arch", "unet") not in ARCHITECTURES:
        raise ModelFileError(f"{source}: unknown architecture {config.get('arch')!r}")
    for key, (lo, hi) in LIMITS.items():
        if key in config and not lo <= config[key] <= hi:
            raise ModelFileError(f"{source}: config entry {key!r} = {config[key]} is outside [{lo}, {hi}]")
    if config.get("prune_level") is not None:
        if config.get("arch") != "unetpp":
            raise ModelFileError(f"{source}: only a U-Net++ has a prune level")
        if not 1 <= config["prune_level"] <= config.get("depth", 4):
            raise ModelFileError(f"{source}: prune level {config['prune_level']} is outside [1, depth]")
    if "dropout" in config and not 0 <= config["dropout"] < 1:
        raise ModelFileError(f"{source}: dropout {config['dropout']} is outside [0, 1)")
    encoding = config.get("encoding")
    if encoding is not None:
        if encoding not in encodings.ENCODINGS:
            raise ModelFileError(f"{source}: unknown encoding {encoding!r}")
        needed = encodings.ENCODINGS[encoding].n_classes
        if needed is not None and config.get("n_classes", needed) != needed:
            raise ModelFileError(f"{source}: encoding {encoding!r} needs {needed} classes")
    return config


def estimated_bytes(config: dict) -> int:
    """Bytes of the weights of the model a config describes (built on torch's meta device,
    which allocates nothing)."""
    from .card import split_config

    with torch.device("meta"):
        model = build_network(split_config({k: v for k, v in config.items() if k != "format_version"})[0])
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def _check_fits(config: dict, source: str) -> None:
    from .devices import available_memory

    try:
        need = estimated_bytes(config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: invalid model config ({exc})") from exc
    free = available_memory(torch.device("cpu"))
    if 4 * need > free:  # weights, and room to use them
        raise ModelFileError(
            f"{source}: the model needs {need / 2**30:.1f} GiB of weights; this machine has {free / 2**30:.1f} GiB free"
        )


def _model_from(config: dict, state: dict, source: str):
    config = {k: v for k, v in validate_config(config, source).items() if k != "format_version"}
    try:
        model = build_model(config)  # checks the card against the network
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: invalid model config ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ModelFileError(f"{source}: weights do not match the config ({detail})") from exc
    _check_finite(state, source)
    return model.eval()


def _load_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            if CONFIG_KEY not in metadata:
                raise ModelFileError(
                    f"{path} holds no napari-unet-studio config: it is a foreign safetensors file "
                    "(import foreign weights from a .pt/.pth state dict with a config)"
                )
            text = metadata[CONFIG_KEY]
            try:
                config = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ModelFileError(f"{path}: the model config is not valid JSON") from exc
            validate_config(config, str(path))
            version = config.get("format_version", 1)
            if version > FORMAT_VERSION:
                raise ModelFileError(f"{path} was written by a newer napari-unet-studio (format {version})")
            if version >= 2 and CHECKSUM_KEY not in metadata:
                raise ModelFileError(f"{path}: the checksum is missing (damaged file)")
            _check_fits(config, str(path))
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except ModelFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path} is not a valid .safetensors file (corrupted or truncated?)") from exc
    if CHECKSUM_KEY in metadata and checksum(text, state) != metadata[CHECKSUM_KEY]:
        raise ModelFileError(f"{path}: the checksum does not match: the file is damaged (re-download or re-train it)")
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
    validate_config(config, str(path))
    _check_fits(config, str(path))
    return _model_from(dict(config), payload, str(path))


def load_model(path: str | os.PathLike = DEFAULT_MODEL, *, config: dict | None = None):
    """Load a model saved by :func:`save_model`, the shipped default, a bioimage.io package made by
    this plugin, or a foreign state dict.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by :func:`save_model`; ``"default"`` for the shipped
        default model; a bioimage.io package (``.zip``) written by
        :func:`~napari_unet_studio.bioimageio.export_bioimageio` (the same model comes back; a
        package from elsewhere is refused); or a ``.pt``/``.pth`` state dict, read with
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
    if path.suffix.lower() == ".zip":
        from .bioimageio import read_bioimageio

        return read_bioimageio(path)
    return _load_safetensors(path)
