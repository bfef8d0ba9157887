"""Data augmentation: the U-Net paper's elastic deformation, plus rigid and gray-value changes.

Elastic deformation (paper, sec. 3.1): random displacement vectors on a coarse ``grid x grid``
lattice over the image, drawn from N(0, sigma^2) pixels, interpolated to a smooth per-pixel
field with bicubic interpolation. The image is resampled with bicubic interpolation, labels
with nearest neighbour (ids stay ids), weight maps bilinearly, all with the same field.
Rotations, flips and shifts are composed into the same sampling grid, so a sample is
resampled once. Everything runs batched in torch (``interpolate`` + ``grid_sample``), on the
GPU during training when there is one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def displacement_field(
    batch: int, shape: tuple[int, int], *, grid: int = 3, sigma: float = 10.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Smooth random displacements ``(batch, 2, H, W)`` in pixels (channel 0: y, 1: x).

    ``grid x grid`` vectors from N(0, sigma^2) on a lattice whose corners are the image
    corners, interpolated bicubically to every pixel.
    """
    if grid < 2:
        raise ValueError(f"the displacement grid needs at least 2x2 points, got {grid}")
    coarse = torch.randn(batch, 2, grid, grid, generator=generator, device="cpu" if generator is not None else device) * sigma
    coarse = coarse.to(device)
    return F.interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=True)


def affine_matrices(
    batch: int,
    *,
    rotate: bool = True,
    flip: bool = True,
    shift: float = 0.0,
    scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random ``(batch, 2, 2)`` rotation/flip matrices and ``(batch, 2)`` shifts, stacked as ``(batch, 2, 3)``.

    Rotations are by any angle; flips are along x (with rotations this gives all 8
    flips/90-degree rotations); shifts are uniform in ``[-shift, shift]`` pixels. With
    ``scale > 0`` each sample is also zoomed by a factor drawn log-uniformly from
    ``[1 / (1 + scale), 1 + scale]`` (objects of other sizes than the painted ones).
    """
    theta = torch.rand(batch, generator=generator) * 2 * math.pi if rotate else torch.zeros(batch)
    sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    cos, sin = torch.cos(theta), torch.sin(theta)
    m = torch.stack([torch.stack([cos, -sin * sign], -1), torch.stack([sin, cos * sign], -1)], -2)
    t = (torch.rand(batch, 2, generator=generator) * 2 - 1) * shift
    if scale > 0:
        # The grid reads the input at A p: a factor above 1 shows more of the input (objects shrink).
        m = m * torch.exp((torch.rand(batch, generator=generator) * 2 - 1) * math.log1p(scale))[:, None, None]
    return torch.cat([m, t[..., None]], -1)


def sampling_grid(displacement: torch.Tensor, affine: torch.Tensor | None = None) -> torch.Tensor:
    """``grid_sample`` grid: output pixel p reads input at ``A (p - c) + c + t + u(p)``.

    ``displacement`` is ``(B, 2, H, W)`` in pixels; ``affine`` is ``(B, 2, 3)`` acting on
    (y, x) offsets from the image centre ``c``.
    """
    b, _, h, w = displacement.shape
    dev, dt = displacement.device, displacement.dtype
    yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=dt), torch.arange(w, device=dev, dtype=dt), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    pos = torch.stack([yy - cy, xx - cx])[None].expand(b, -1, -1, -1)
    if affine is not None:
        affine = affine.to(dev, dt)
        pos = torch.einsum("bij,bjhw->bihw", affine[:, :, :2], pos) + affine[:, :, 2, None, None]
    y = pos[:, 0] + cy + displacement[:, 0]
    x = pos[:, 1] + cx + displacement[:, 1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    return torch.stack([x / max(w - 1, 1) * 2 - 1, y / max(h - 1, 1) * 2 - 1], -1)


def warp(tensor: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample ``(B, C, H, W)`` at ``grid`` with mirror padding (``mode``: bicubic, bilinear, nearest)."""
    return F.grid_sample(tensor, grid, mode=mode, padding_mode="reflection", align_corners=True)


class Deformed(NamedTuple):
    """Result of :func:`elastic_deform`: the deformed arrays (``None`` where none was given)."""

    image: np.ndarray
    labels: np.ndarray | None
    weights: np.ndarray | None
    displacement: np.ndarray  # (2, H, W): y and x displacement in pixels


def elastic_deform(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    seed: int | None = None,
) -> Deformed:
    """Deform an image (and its labels and weight map) with one random elastic deformation.

    Parameters
    ----------
    image
        ``(Y, X)`` or ``(Y, X, C)``.
    labels
        ``(Y, X)`` integer labels, resampled by nearest neighbour.
    weights
        ``(Y, X)`` weight map, resampled bilinearly.
    grid
        Points per side of the coarse displacement lattice (paper: 3).
    sigma
        Standard deviation of the displacements in pixels (paper: 10).
    seed
        Seed for a reproducible deformation.

    Returns
    -------
    Deformed
        ``(image, labels, weights, displacement)``, each deformed with the same field;
        ``displacement`` is ``(2, Y, X)`` in pixels.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"elastic_deform takes (Y, X) or (Y, X, C) images, got shape {image.shape}")
    shape = image.shape[:2]
    for name, arr in (("labels", labels), ("weights", weights)):
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(f"{name} shape {np.shape(arr)} does not match the image's {shape}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    field = displacement_field(1, shape, grid=grid, sigma=sigma, generator=generator)
    sgrid = sampling_grid(field)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    img = img[None, None] if image.ndim == 2 else img.permute(2, 0, 1)[None]
    out = warp(img, sgrid, "bicubic")[0]
    out_image = (out[0] if image.ndim == 2 else out.permute(1, 2, 0)).numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out_image = np.clip(np.rint(out_image), info.min, info.max).astype(image.dtype)
    out_labels = out_weights = None
    if labels is not None:
        lab = torch.from_numpy(np.asarray(labels).astype(np.float64))[None, None]
        out_labels = warp(lab, sgrid.double(), "nearest")[0, 0].numpy().round().astype(np.asarray(labels).dtype)
    if weights is not None:
        wt = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))[None, None]
        out_weights = warp(wt, sgrid, "bilinear")[0, 0].numpy()
    return Deformed(out_image, out_labels, out_weights, field[0].numpy())


def gray_value_augment(
    x: torch.Tensor, *, generator: torch.Generator | None = None, strength: float = 1.0, invert: float = 0.0
) -> torch.Tensor:
    """Random gamma, contrast, brightness and Gaussian noise on normalised ``(B, C, H, W)`` images;
    with probability ``invert`` a sample's polarity is reversed first (``1 - x``: bright objects on a
    dark background become dark on bright, and the reverse)."""
    b = x.shape[0]
    dev = x.device
    if invert > 0:
        flip = (torch.rand(b, 1, 1, 1, generator=generator) < invert).to(dev)
        x = torch.where(flip, 1 - x, x)

    def uniform(lo, hi):
        return (torch.rand(b, 1, 1, 1, generator=generator) * (hi - lo) + lo).to(dev)

    gamma = torch.exp(uniform(-0.3 * strength, 0.3 * strength))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    x = ((x - lo) / span).clamp_min(0) ** gamma * span + lo
    x = x * uniform(1 - 0.25 * strength, 1 + 0.25 * strength) + uniform(-0.1 * strength, 0.1 * strength)
    noise = uniform(0, 0.05 * strength) * torch.randn(x.shape, generator=generator).to(dev)
    return x + noise
