"""Choosing the compute device and estimating how much memory it has free."""

from __future__ import annotations

import os

import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """True when Apple's Metal backend is built and usable."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on.

    ``None`` or ``"auto"`` picks CUDA when present, then MPS, then the CPU. An explicit device
    that is not available raises :class:`~napari_unet_studio.errors.InputError`.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r} (choose one of {', '.join(DEVICE_CHOICES)})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available")
    if dev.type == "mps" and not mps_available():
        raise InputError("MPS was requested but Apple's Metal backend is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r} (choose one of {', '.join(DEVICE_CHOICES)})")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on ``device`` (host memory for CPU and MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 4 << 30  # a conservative guess when the OS will not say


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors torch raises when a device (or the host) runs out of memory."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)
