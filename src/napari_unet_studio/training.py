"""Training and fine-tuning: weighted cross-entropy on elastically deformed random crops.

Each (image, labels) pair is prepared once: the image is normalised with the model's
normalisation, the instance labels are encoded into the model's classes, and the paper's weight
map is computed. Every step draws random crops of the network's valid input size (centred on
annotated pixels, so sparse annotation and regions work), deforms image, classes and weights
with one shared random field (elastic + rotation/flip), varies gray values, and minimises the
weight-map-weighted softmax cross-entropy over the valid output. Pixels marked "ignore" (a
reserved label value, or outside the given regions) have weight 0 and contribute nothing.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from .augment import affine_matrices, displacement_field, gray_value_augment, sampling_grid, warp
from .devices import resolve_device
from .errors import InputError
from .inference import ImageLayout
from .metrics import as_instances  # noqa: F401 (part of this module's API too)
from .models import Geometry, widen_input
from .normalize import adapt_channels
from .tiling import reflect_indices
from .weightmap import weight_map

#: Class index of ignored pixels in the encoded targets.
IGNORE_INDEX = -100
#: Output size (pixels) the default training crop is sized for.
DEFAULT_CROP_OUTPUT = 260


def encode_targets(labels: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """Classes for ``encoding`` from instance labels, and the labels the weight map is made of.

    ``"boundary"``: 0 background, 1 interior, 2 the objects' inner boundary pixels.
    ``"foreground"``: 0 background, 1 foreground, where pixels of an object that touch another
    object become background, so touching objects are separated by a gap the network learns
    (with the weight map's help) to predict.
    """
    labels = np.asarray(labels)
    if encoding == "boundary":
        boundary = find_boundaries(labels, mode="inner") & (labels > 0)
        target = np.where(labels > 0, np.where(boundary, 2, 1), 0)
        return target.astype(np.int64), labels
    if encoding == "foreground":
        separated = np.where(_touches_other_object(labels), 0, labels)
        return (separated > 0).astype(np.int64), separated
    raise ValueError(f"cannot train the {encoding!r} encoding")


def _touches_other_object(labels: np.ndarray) -> np.ndarray:
    """Object pixels with a different object among their 8 neighbours."""
    lab = labels.astype(np.int64)
    big = int(lab.max(initial=0)) + 1  # stands in for background in the minimum (no overflow)
    hi = ndi.maximum_filter(lab, size=3)
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), size=3)
    return (lab > 0) & ((hi != lab) | (lo != lab))


@dataclass
class TrainingPair:
    """One prepared training image: normalised pixels, encoded classes, loss weights."""

    image: np.ndarray  # (C, H, W) float32, normalised
    target: np.ndarray  # (H, W) int64 classes, IGNORE_INDEX where not annotated
    weights: np.ndarray  # (H, W) float32 loss weights, 0 where not annotated
    annotated: np.ndarray  # flat indices of annotated pixels (crop centres are drawn from these)


def prepare_pair(
    model,
    image,
    labels,
    *,
    region: np.ndarray | None = None,
    ignore_value: int | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    channel_axis: int | None = None,
) -> TrainingPair:
    """Normalise, encode and weight one (image, labels) pair for :func:`train`."""
    layout = ImageLayout(image, channel_axis)
    if layout.is_stack:
        raise InputError(f"training takes 2-D images (or 2-D with channels), got shape {layout.shape}")
    labels = np.asarray(labels)
    if labels.shape != layout.plane:
        raise InputError(f"labels of shape {labels.shape} do not match the image's {layout.plane}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"labels must be integers, got {labels.dtype}")
    pixels = adapt_channels(layout.read(0, slice(None), slice(None)), model.in_channels)
    pixels = model.normalization.apply(pixels, model.normalization.statistics(pixels))
    ignore = np.zeros(labels.shape, bool) if ignore_value is None else labels == ignore_value
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != labels.shape:
            raise InputError(f"region mask of shape {region.shape} does not match the labels' {labels.shape}")
        ignore |= ~region
    instances = as_instances(np.where(ignore, 0, labels))
    target, separated = encode_targets(instances, model.encoding)
    # Class balance counts annotated pixels only; ignored pixels get weight 0.
    weights = weight_map(np.where(ignore, -1, separated), w0=w0, sigma=sigma, ignore_value=-1)
    target[ignore] = IGNORE_INDEX
    annotated = np.flatnonzero(~ignore)
    if annotated.size == 0:
        raise InputError("no annotated pixels: everything is marked ignore or outside the regions")
    return TrainingPair(np.ascontiguousarray(np.moveaxis(pixels, -1, 0)), target, weights.astype(np.float32), annotated)


class CropSampler:
    """Random training crops: input-sized windows (mirrored at image borders) around annotated pixels."""

    def __init__(self, pairs: Sequence[TrainingPair], input_size: int, rng: np.random.Generator) -> None:
        self.pairs = list(pairs)
        self.size = input_size
        self.rng = rng
        sizes = np.array([p.annotated.size for p in self.pairs], float)
        self.p = sizes / sizes.sum()

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x (B,C,S,S), target (B,S,S), weights (B,S,S))`` centred on annotated pixels."""
        c = self.pairs[0].image.shape[0]
        s = self.size
        x = np.empty((batch, c, s, s), np.float32)
        t = np.empty((batch, s, s), np.int64)
        w = np.empty((batch, s, s), np.float32)
        for b in range(batch):
            pair = self.pairs[self.rng.choice(len(self.pairs), p=self.p)]
            h, wd = pair.target.shape
            cy, cx = np.unravel_index(pair.annotated[self.rng.integers(pair.annotated.size)], (h, wd))
            # Jitter the centre so annotated pixels land anywhere in the output, not only its middle.
            cy += int(self.rng.integers(-s // 4, s // 4 + 1))
            cx += int(self.rng.integers(-s // 4, s // 4 + 1))
            rows = reflect_indices(np.arange(cy - s // 2, cy - s // 2 + s), h)
            cols = reflect_indices(np.arange(cx - s // 2, cx - s // 2 + s), wd)
            ix = np.ix_(rows, cols)
            x[b] = pair.image[:, rows][:, :, cols]
            t[b] = pair.target[ix]
            w[b] = pair.weights[ix]
        return x, t, w


def augment_batch(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    generator: torch.Generator | None = None,
    gray: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elastic + rotation/flip with one field per sample for image, classes and weights; gray values."""
    b, _, h, w = x.shape
    field = displacement_field(b, (h, w), grid=grid, sigma=sigma, generator=generator, device=x.device)
    sgrid = sampling_grid(field, affine_matrices(b, generator=generator))
    x = warp(x, sgrid, "bicubic")
    target = warp(target[:, None].to(x.dtype), sgrid, "nearest")[:, 0].round().long()
    weights = warp(weights[:, None], sgrid, "bilinear")[:, 0]
    weights = torch.where(target == IGNORE_INDEX, torch.zeros_like(weights), weights)
    if gray:
        x = gray_value_augment(x, generator=generator)
    return x, target, weights


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The paper's energy: weight-map-weighted softmax cross-entropy, averaged over annotated pixels."""
    valid = target != IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), target.clamp_min(0), reduction="none")
    return (ce * weights * valid).sum() / valid.sum().clamp_min(1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the non-background classes, on annotated pixels."""
    valid = (target != IGNORE_INDEX).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), 1) * valid
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum((0, 2, 3))[1:]
    total = (probs + onehot).sum((0, 2, 3))[1:]
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


def _center(t: torch.Tensor, size: int) -> torch.Tensor:
    top = (t.shape[-2] - size) // 2
    left = (t.shape[-1] - size) // 2
    return t[..., top : top + size, left : left + size]


def _learning_rate(base: float, fraction: float, step: int, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``base`` as the run's fraction goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))))


def will_widen(model, images: Sequence, channel_axis: int | None = None) -> bool:
    """Whether :func:`train` (with ``widen_for_rgb=True``) widens ``model`` for ``images``:
    a one-channel model and only RGB(A) images."""
    if model.in_channels != 1 or not len(images):
        return False
    return all(ImageLayout(im, channel_axis).n_channels in (3, 4) for im in images)


def train(
    model,
    images: Sequence,
    labels: Sequence,
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    regions: Sequence | None = None,
    seed: int | None = None,
    progress: Callable[[dict], object] | None = None,
    cancel: Callable[[], bool] | None = None,
    batch_size: int = 2,
    tile_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 1e-5,
    optimizer: str = "adam",
    schedule: str = "cosine",
    widen_for_rgb: bool = True,
    fine_tune: bool | None = None,
    freeze_encoder: bool = False,
    ignore_value: int | None = None,
    val_images: Sequence | None = None,
    val_labels: Sequence | None = None,
    val_every: int | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    deep_supervision: bool = True,
    dice_weight: float = 0.0,
    augment: bool = True,
    device=None,
    channel_axis: int | None = None,
):
    """Train (or fine-tune) ``model`` on (image, labels) pairs; returns ``(model, history)``.

    Parameters
    ----------
    model
        A :class:`~napari_unet_studio.UNet` or :class:`~napari_unet_studio.UNetPlusPlus`.
    images, labels
        Sequences of 2-D images (any size or dtype, optionally with channels) and their
        instance labels (0 = background; a label image with one non-zero value is a mask whose
        connected components are the objects).
    steps, time_budget
        Stop after this many optimiser steps and/or seconds (whichever comes first);
        with neither, 500 steps.
    regions
        Optional boolean masks (one per image, or ``None`` entries): train only inside them.
    seed
        Makes the run reproducible on the CPU.
    progress
        Called after every step with a dict: ``step``, ``steps``, ``loss``, ``lr``,
        ``elapsed``, ``fraction`` and, after a validation, ``val_ap50``.
    cancel
        Polled every step; when True, training stops and the best model so far is returned.
    batch_size, tile_size
        Crops per step and their input edge (rounded to a valid size; default: the smallest
        valid input whose output is >= 260 px, i.e. 444 for depth 4: on a CPU, 2 crops of 444 train
        1.6x more output pixels per second than 4 of 348).
    lr
        Peak learning rate; default 1e-3 from scratch and 3e-4 when fine-tuning (Adam).
    optimizer, schedule
        ``"adam"`` (default) or the paper's ``"sgd"`` (momentum 0.99); ``"cosine"`` (default:
        20 warm-up steps, then cosine decay to 5 %) or ``"constant"`` (after the warm-up).
        The defaults won a comparison at equal steps and similar pixels per step
        (``benchmarks/optimizer.py``: AP@0.5 0.738 vs 0.664 without the decay and 0.699 for
        the paper's SGD, one 572 px crop per step).
    fine_tune
        Whether the model starts from trained weights (default: it has a training provenance).
    widen_for_rgb
        When a one-channel model meets only RGB(A) training images, train a copy whose first
        convolution is widened to three channels (:func:`~napari_unet_studio.models.widen_input`,
        starting from the luminance weights) so it can learn colour; the returned model then
        takes RGB. Measured on stained tissue (README): better than training on the luminance.
        With ``False`` (or mixed gray and colour images) RGB images are used as their luminance.
    freeze_encoder
        Keep the contracting path fixed (fine-tuning on very few labels).
    ignore_value
        Label value meaning "not annotated" (weight 0).
    val_images, val_labels
        Optional validation pairs; AP@0.5 is measured every ``val_every`` steps and the best
        model by it is returned.
    w0, sigma
        Weight-map parameters.
    deep_supervision
        U-Net++: average the loss over all heads.
    dice_weight
        Adds this times a soft Dice loss.
    augment
        Elastic, rotation/flip and gray-value augmentation.
    device
        As for :func:`~napari_unet_studio.predict`; CUDA uses mixed precision.

    Returns
    -------
    model, history
        The trained model with the best weights seen (``model`` itself, trained in place, or
        its widened copy, see ``widen_for_rgb``), in eval mode; and one record per step.
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} label images")
    if not len(images):
        raise InputError("no training images")
    if steps is None and time_budget is None:
        steps = 500
    if regions is None:
        regions = [None] * len(images)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    device = resolve_device(device)
    if fine_tune is None:
        fine_tune = bool(model.provenance.get("training"))
    lr = lr if lr is not None else (3e-4 if fine_tune else 1e-3)
    widened = widen_for_rgb and will_widen(model, images, channel_axis)
    if widened:
        model = widen_input(model)
    pairs = [
        prepare_pair(model, im, lab, region=reg, ignore_value=ignore_value, w0=w0, sigma=sigma, channel_axis=channel_axis)
        for im, lab, reg in zip(images, labels, regions)
    ]
    if not any((p.target > 0).any() for p in pairs):
        raise InputError("the labels contain no objects")
    validate = val_images is not None and len(val_images) > 0
    if validate:
        val_labels = [as_instances(v) for v in val_labels]
    geometry = Geometry(model.depth)
    size = geometry.valid_input(tile_size) if tile_size else geometry.input_for_output(DEFAULT_CROP_OUTPUT)
    out_size = geometry.output_size(size)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    sampler = CropSampler(pairs, size, rng)
    if val_every is None:
        val_every = max(25, (steps or 500) // 10)

    prune_level = getattr(model, "prune_level", None)
    if prune_level is not None:
        model.prune_level = None
    model.to(device)
    if freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.99, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    deep = deep_supervision and hasattr(model, "forward_deep")

    history: list[dict] = []
    best = {"score": -math.inf, "state": None, "step": 0}
    ema = None
    start = time.perf_counter()
    step = 0
    stopped = "steps"
    # Seed a private copy of the RNG state, so the caller's random streams are left alone.
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []):
        if seed is not None:
            torch.manual_seed(seed)
        while True:
            elapsed = time.perf_counter() - start
            if steps is not None and step >= steps:
                break
            if time_budget is not None and elapsed >= time_budget:
                stopped = "time"
                break
            if cancel is not None and cancel():
                stopped = "cancelled"
                break
            fraction = max(step / steps if steps else 0.0, elapsed / time_budget if time_budget else 0.0)
            for group in opt.param_groups:
                group["lr"] = _learning_rate(lr, fraction if schedule == "cosine" else 0.0, step)
            model.train()
            if freeze_encoder:
                model.encoder.eval()  # frozen means its BatchNorm statistics too
            x, t, w = (torch.from_numpy(a).to(device) for a in sampler.sample(batch_size))
            if augment:
                x, t, w = augment_batch(x, t, w, generator=generator)
            t, w = _center(t, out_size), _center(w, out_size)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                outputs = model.forward_deep(x) if deep else [model(x)]
            loss = sum(weighted_cross_entropy(o, t, w) for o in outputs) / len(outputs)
            if dice_weight:
                loss = loss + dice_weight * sum(soft_dice_loss(o, t) for o in outputs) / len(outputs)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            record = {
                "step": step,
                "steps": steps,
                "loss": value,
                "lr": opt.param_groups[0]["lr"],
                "elapsed": time.perf_counter() - start,
                "fraction": min(1.0, max(step / steps if steps else 0.0, (time.perf_counter() - start) / time_budget if time_budget else 0.0)),
            }
            if step % val_every == 0:
                score = _validate(model, val_images, val_labels, device) if validate else -ema
                if validate:
                    record["val_ap50"] = score
                if score > best["score"]:
                    best = {"score": score, "state": copy.deepcopy(model.state_dict()), "step": step}
            history.append(record)
            if progress is not None:
                progress(record)
        # The final weights count too.
        if step and step % val_every:
            score = _validate(model, val_images, val_labels, device) if validate else -(ema if ema is not None else math.inf)
            if validate:
                history[-1]["val_ap50"] = score
                if progress is not None:
                    progress(history[-1])  # the same step again, now with its validation score
            if score > best["score"]:
                best = {"score": score, "state": copy.deepcopy(model.state_dict()), "step": step}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    for p in model.parameters():
        p.requires_grad_(True)
    if prune_level is not None:
        model.prune_level = prune_level
    model.eval()
    runs = list(model.provenance.get("training", []))
    runs.append(
        {
            "images": len(pairs),
            "steps": step,
            "best_step": best["step"],
            "seconds": round(time.perf_counter() - start, 1),
            "stopped": stopped,
            "batch_size": batch_size,
            "tile_size": size,
            "lr": lr,
            "fine_tune": bool(fine_tune),
            "seed": seed,
            **({"input_widened": "1 -> 3 channels"} if widened else {}),
            **({"val_ap50": best["score"]} if validate else {}),
        }
    )
    model.provenance["training"] = runs
    return model, history


def _validate(model, images, labels, device) -> float:
    from .inference import segment
    from .metrics import average_precision

    scores = [average_precision(segment(model, im, device=device), lab)[0.5] for im, lab in zip(images, labels)]
    return float(np.mean(scores))
