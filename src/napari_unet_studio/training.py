"""Training and fine-tuning: weighted cross-entropy on elastically deformed random crops.

One loop serves everything: :class:`TrainingSession` is a step-wise trainer whose (image,
labels) pairs can be added or replaced while it runs. :func:`train` (the command line, scripts,
benchmarks), the Fine-tune dock and its live mode all drive it.

Each (image, labels) pair is prepared once: the image is normalised with the model's
normalisation, the instance labels are encoded into the model's classes, and the paper's weight
map is computed. Every step draws random crops of the network's valid input size (centred on
annotated pixels, so sparse annotation and regions work), deforms image, classes and weights
with one shared random field (elastic + rotation/flip), varies gray values, and minimises the
weight-map-weighted softmax cross-entropy over the valid output. Pixels marked "ignore" (a
reserved label value, or outside the given regions) have weight 0 and contribute nothing.

When the labels the model gave before the user painted are known (``previous``), the pixels the
user corrected (:mod:`.corrections`) are where crops are centred half of the time, and their
loss weight is multiplied by ``1 + correction_weight``. Without a validation pair, a few painted
objects are held out (never trained on) and AP@0.5 on them chooses the best weights, the
weights before training included, so training longer never ends worse on them.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from . import __version__
from .augment import affine_matrices, displacement_field, gray_value_augment, sampling_grid, warp
from .corrections import find_corrections
from .devices import ThreadFitter, resolve_device
from .errors import InputError
from .layout import ImageLayout, Window, stack_axes
from .metrics import as_instances  # noqa: F401 (part of this module's API too)
from .card import build_model, card_of, model_config
from . import encodings
from .models import Geometry
from .normalize import LUMINANCE, adapt_channels
from .provenance import hardware, image_record
from .rescale import check_scale, rescale_plane
from .tiling import reflect_indices
from .weightmap import class_balance, separation, separation_radius

#: Class index of ignored pixels in the encoded targets.
IGNORE_INDEX = -100
#: Output size (pixels) the default training crop is sized for.
DEFAULT_CROP_OUTPUT = 260
#: Share of crops centred on corrected pixels when there are corrections.
CORRECTION_SHARE = 0.5
#: Corrected pixels weigh ``1 + CORRECTION_WEIGHT`` times their weight-map weight.
CORRECTION_WEIGHT = 2.0
#: Share of the painted objects held out to choose the best weights when no validation is given.
HOLDOUT_FRACTION = 0.15
#: Fewest objects (over all pairs) for an automatic hold-out; at most this many are held out.
HOLDOUT_MIN_OBJECTS, HOLDOUT_MAX_OBJECTS = 8, 20
#: Held-out objects needed before the starting weights may be kept: AP@0.5 on fewer moves in
#: steps of 0.1 or more, too coarse to overrule what the user asked for (measured in
#: benchmarks/corrections.py: with 2-3 held-out objects the starting weights won on stained tissue
#: while plain fine-tuning improved held-out images).
HOLDOUT_TRUSTED = 10
#: Background ring (pixels) around held-out objects that is held out and scored with them.
HOLDOUT_MARGIN = 4
#: Fine-tuning learning rate (Adam), and the gentler one for images the model finds familiar
#: (its card's uncertainty, :func:`~.inference.is_unfamiliar`): measured with the simulated user
#: (benchmarks/corrections.py), 3e-4 on two fluorescence images cost up to 0.2 held-out AP@0.5 within
#: 30 steps, 3e-5 did not; on kinds the model never saw, 3e-4 is what moved it (benchmarks/finetune.py).
FINE_TUNE_LR, FAMILIAR_LR = 3e-4, 3e-5
#: Training images on which a finished run measures the model's uncertainty (model card).
UNCERTAINTY_IMAGES = 3
#: Share of crops drawn from replay pairs (examples of what the model already knew).
REPLAY_SHARE = 0.2


@dataclass
class HoldOut:
    """A scored region: painted objects kept out of training (the hold-out), or the objects
    around a correction (trained on, and checked to be learned). AP@0.5 on them chooses the
    best weights."""

    window: tuple[slice, slice]  # the region of the image that is segmented to score them
    truth: np.ndarray  # (window) instance labels of the held-out objects, 0 elsewhere
    scored: np.ndarray  # (window) bool: held-out objects and their background ring

    @property
    def n_objects(self) -> int:
        return int(len(np.unique(self.truth[self.truth > 0])))


@dataclass
class TrainingPair:
    """One prepared training image: normalised pixels, encoded classes, loss weights."""

    image: np.ndarray  # (C, H, W) float32, normalised
    target: np.ndarray  # (H, W) int64 classes, IGNORE_INDEX where not annotated
    weights: np.ndarray  # (H, W) float32 loss weights, 0 where not annotated
    annotated: np.ndarray  # flat indices of annotated pixels (crop centres are drawn from these)
    corrected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # flat indices
    holdout: HoldOut | None = None
    checks: list = field(default_factory=list)  # HoldOut regions around the corrections
    source: object = None  # the raw image (to score the hold-out as segment() sees it)
    corrections: object = None  # the :class:`~.corrections.Corrections`, when previous labels were given
    # (C + 1, H, W) float16: the starting model's class probabilities and, last, 1 where the user
    # left the model's labels as they were (trained towards those probabilities; see ``distill``).
    soft: np.ndarray | None = None
    record: dict = field(default_factory=dict)  # what the run's provenance says of this image
    # What a later stroke on the same image needs to prepare only the region it changed.
    painted: np.ndarray | None = None  # (H, W) the labels as given
    inputs: tuple = ()  # (region, previous, ignore_value, w0, sigma, correction_weight, channel_axis)
    ignore: np.ndarray | None = None  # (H, W) bool, not annotated (before any hold-out)
    foreground: np.ndarray | None = None  # (H, W) bool, foreground of the encoded targets
    separation: np.ndarray | None = None  # (H, W) float32, the weight map's separation term
    encoded: np.ndarray | None = None  # (H, W) int64 classes before anything is ignored


def _choose_holdout(instances: np.ndarray, ignore: np.ndarray, protected: np.ndarray, k: int, rng) -> HoldOut | None:
    """Hold out ``k`` objects close to each other (one compact window to segment), away from
    the ``protected`` (corrected) pixels."""
    ids = np.unique(instances[instances > 0])
    if protected.any():
        near = np.unique(instances[ndi.binary_dilation(protected, iterations=HOLDOUT_MARGIN + 2)])
        ids = np.setdiff1d(ids, near)
    if k < 1 or ids.size < k:
        return None
    centres = np.array(ndi.center_of_mass(np.ones_like(instances), instances, ids))
    anchor = centres[rng.integers(ids.size)]
    chosen = ids[np.argsort(((centres - anchor) ** 2).sum(1))[:k]]
    held = np.isin(instances, chosen)
    scored = ndi.binary_dilation(held, iterations=HOLDOUT_MARGIN) & ~ignore
    rows, cols = np.nonzero(scored)
    h, w = instances.shape
    window = (slice(max(rows.min() - 8, 0), min(rows.max() + 9, h)), slice(max(cols.min() - 8, 0), min(cols.max() + 9, w)))
    truth = np.where(held, instances, 0)[window]
    return HoldOut(window, truth, scored[window])


#: At most this many regions around corrections are checked at each choice of weights.
MAX_CORRECTION_CHECKS = 8


def _correction_checks(instances: np.ndarray, changed: np.ndarray, ignore: np.ndarray, previous: np.ndarray) -> list[HoldOut]:
    """Regions around the corrections (nearby ones grouped), with the objects they are about.

    A correction is about the painted objects whose pixels changed and those that overlap a
    model object that changed (both halves of a split): those are the truth of its region. An
    erased object leaves a region with no truth, where any predicted object is a false one.
    Objects the user left as the model drew them are not scored here, also when they touch a
    correction: they would score the starting weights perfectly whatever was learned."""
    from .corrections import _box

    h, w = instances.shape
    touched_old = np.unique(previous[changed])
    involved = changed | (np.isin(previous, touched_old[touched_old > 0]) & ~ignore)
    about = np.unique(instances[involved])
    # Worked out in the box around the corrections and their objects: a stroke's cost.
    box = _box(involved | np.isin(instances, about[about > 0]), margin=16 + HOLDOUT_MARGIN + 1)
    if box is None:
        return []
    (y0, _), (x0, _) = ((s.start, s.stop) for s in box)
    instances, involved, ignore = instances[box], involved[box], ignore[box]
    groups, n = ndi.label(ndi.binary_dilation(involved, iterations=16))
    if n == 0:
        return []
    sizes = ndi.sum(involved, groups, range(1, n + 1))
    checks = []
    for g in np.argsort(sizes)[::-1][:MAX_CORRECTION_CHECKS] + 1:
        region = (groups == g) & involved
        objects = np.unique(instances[region])
        objects = objects[objects > 0]
        scored = ndi.binary_dilation(region | np.isin(instances, objects), iterations=HOLDOUT_MARGIN) & ~ignore
        rows, cols = np.nonzero(scored)
        rows, cols = rows + y0, cols + x0
        window = (slice(max(rows.min() - 8, 0), min(rows.max() + 9, h)), slice(max(cols.min() - 8, 0), min(cols.max() + 9, w)))
        local = (slice(window[0].start - y0, window[0].stop - y0), slice(window[1].start - x0, window[1].stop - x0))
        truth = np.where(np.isin(instances, objects), instances, 0)[local]
        checks.append(HoldOut(window, truth, scored[local]))
    return checks


def prepare_pair(
    model,
    image,
    labels,
    *,
    region: np.ndarray | None = None,
    previous: np.ndarray | None = None,
    ignore_value: int | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    channel_axis: int | None = None,
    correction_weight: float = CORRECTION_WEIGHT,
    holdout: int = 0,
    check_corrections: bool = False,
    rng: np.random.Generator | None = None,
    before: TrainingPair | None = None,
    statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainingPair:
    """Normalise, encode and weight one (image, labels) pair for training.

    ``previous``: the labels the model gave before the user painted ``labels``; the corrected
    pixels get ``1 + correction_weight`` times their weight. ``holdout``: how many objects to
    keep out of training for choosing the best weights (none when there are too few);
    ``check_corrections``: also score the regions around the corrections when choosing.
    ``before``: this image's pair as prepared for earlier labels (the user painted more): only
    the region the new strokes changed is encoded and weighted again (the result is the same).
    ``statistics``: the normalisation statistics to use (those of the image this one is a
    window of, :meth:`~napari_unet_studio.inference.Window.statistics`) instead of the image's own.
    """
    inputs = (region, previous, ignore_value, w0, sigma, correction_weight, channel_axis, statistics)
    if before is not None and holdout == 0 and _same_inputs(before, image, inputs):
        pair = _update_pair(model, before, labels, check_corrections)
        if pair is not None:
            return pair
    layout = ImageLayout(image, channel_axis)
    if layout.is_stack:
        raise InputError(f"training takes 2-D images (or 2-D with channels), got shape {layout.shape}")
    labels = np.asarray(labels)
    if labels.shape != layout.plane:
        raise InputError(f"labels of shape {labels.shape} do not match the image's {layout.plane}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"labels must be integers, got {labels.dtype}")
    pixels = adapt_channels(layout.read(0, slice(None), slice(None)), model.in_channels)
    norm = card_of(model).normalization
    pixels = norm.apply(pixels, norm.statistics(pixels) if statistics is None else statistics)
    ignore = np.zeros(labels.shape, bool) if ignore_value is None else labels == ignore_value
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != labels.shape:
            raise InputError(f"region mask of shape {region.shape} does not match the labels' {labels.shape}")
        ignore |= ~region
    instances = as_instances(np.where(ignore, 0, labels))
    if instances.min(initial=0) < 0:
        raise InputError("labels must be 0 (background) or positive object ids, found negative values "
                         "(a value meaning 'not annotated' can be given as the ignore value)")
    corrections = None
    corrected = np.zeros(labels.shape, bool)
    if previous is not None:
        previous = np.asarray(previous)
        if previous.shape != labels.shape:
            raise InputError(f"previous labels of shape {previous.shape} do not match the labels' {labels.shape}")
        corrections = find_corrections(previous, np.where(ignore, 0, labels), ignore=ignore)
        corrected = corrections.mask
    target, separated = encodings.get(card_of(model).encoding).targets(instances)
    # Class balance counts annotated pixels only; ignored pixels get weight 0.
    separated = np.where(ignore, 0, separated)
    term = separation(separated, w0=w0, sigma=sigma)
    weights = class_balance(separated, ignore) + term
    ignore_before_holdout = ignore.copy()
    base = (ignore_before_holdout, separated > 0, term, target.copy())
    if corrected.any():
        weights = np.where(corrected, weights * (1.0 + correction_weight), weights)
    held = None
    if holdout > 0:
        held = _choose_holdout(instances, ignore, corrected, holdout, rng or np.random.default_rng(0))
        if held is not None:
            ignore = ignore.copy()
            ignore[held.window] |= held.scored
    annotated = _leave_out(target, weights, ignore)
    pair = TrainingPair(
        np.ascontiguousarray(np.moveaxis(pixels, -1, 0)),
        target,
        weights.astype(np.float32),
        annotated,
        np.flatnonzero(corrected & ~ignore),
        held,
        _correction_checks(instances, corrections.changed, ignore, previous)
        if check_corrections and corrections is not None else [],
        image,
        corrections,
    )
    if not _mask_like(np.where(ignore_before_holdout, 0, labels)):  # a mask's objects are its components: no local update
        pair.painted, pair.inputs = labels, inputs
        pair.ignore, pair.foreground, pair.separation, pair.encoded = base
    return pair


def _leave_out(target: np.ndarray, weights: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Mark the ``ignore`` pixels in ``target`` and zero their ``weights`` (in place); returns the
    flat indices of the annotated pixels (an InputError when there are none)."""
    weights[ignore] = 0.0
    target[ignore] = IGNORE_INDEX
    annotated = np.flatnonzero(~ignore)
    if annotated.size == 0:
        raise InputError("no annotated pixels: everything is marked ignore or outside the regions")
    return annotated


def _mask_like(labels: np.ndarray) -> bool:
    """Whether :func:`~napari_unet_studio.metrics.as_instances` takes ``labels`` as a binary mask."""
    if labels.dtype == bool:
        return True
    nonzero = labels[labels != 0]
    return nonzero.size > 0 and nonzero.min() == nonzero.max()


def _same_inputs(before: TrainingPair, image, inputs: tuple) -> bool:
    """Whether ``before`` was prepared from this very image with these settings."""
    if before.painted is None or before.source is not image or len(before.inputs) != len(inputs):
        return False
    return all(a is b or (type(a) is type(b) and not isinstance(a, np.ndarray) and a == b)
               for a, b in zip(before.inputs, inputs))


def _update_pair(model, before: TrainingPair, labels: np.ndarray, check_corrections: bool) -> TrainingPair | None:
    """:func:`prepare_pair` for new ``labels`` on the image of ``before``, redoing only the region
    the change reaches: the targets within a pixel of it, the separation term within the weight
    map's radius; the class balance, corrections and hold-out bookkeeping over the image (cheap).
    None when a full preparation is needed (the labels became a binary mask)."""
    from .corrections import _box

    labels = np.asarray(labels)
    if labels.shape != before.painted.shape:
        return None
    region, previous, ignore_value, w0, sigma, correction_weight, _, _ = before.inputs
    diff = labels != before.painted
    ignore = before.ignore.copy()
    foreground = before.foreground.copy()
    term = before.separation.copy()
    target = before.encoded.copy()
    reach = int(math.ceil(separation_radius(w0, sigma))) + 1
    crop = _box(diff, margin=2 + 2 * reach)
    if crop is not None:
        if ignore_value is not None:
            ignore[crop] = labels[crop] == ignore_value
            if region is not None:
                ignore[crop] |= ~np.asarray(region, bool)[crop]
        local = np.where(ignore[crop], 0, labels[crop]).astype(np.int64)
        t, separated = encodings.get(card_of(model).encoding).targets(local)
        separated = np.where(ignore[crop], 0, separated)
        s = separation(separated, w0=w0, sigma=sigma)
        inner = _box(diff, margin=1)  # targets change within a pixel of the strokes
        at = tuple(slice(a.start - c.start, a.stop - c.start) for a, c in zip(inner, crop))
        target[inner] = t[at]
        foreground[inner] = separated[at] > 0
        near = _box(diff, margin=1 + reach)  # the separation term, within its radius of them
        at = tuple(slice(a.start - c.start, a.stop - c.start) for a, c in zip(near, crop))
        term[near] = s[at]
    instances = np.where(ignore, 0, labels).astype(np.int64)
    if _mask_like(instances):
        return None
    weights = class_balance(foreground, ignore) + term
    encoded = target.copy()
    corrections = None
    corrected = np.zeros(labels.shape, bool)
    if previous is not None:
        corrections = find_corrections(np.asarray(previous), instances, ignore=ignore)
        corrected = corrections.mask
        if corrected.any():
            weights = np.where(corrected, weights * (1.0 + correction_weight), weights)
    annotated = _leave_out(target, weights, ignore)
    pair = TrainingPair(
        before.image, target, weights.astype(np.float32), annotated, np.flatnonzero(corrected & ~ignore), None,
        _correction_checks(instances, corrections.changed, ignore, np.asarray(previous))
        if check_corrections and corrections is not None else [],
        before.source, corrections,
    )
    pair.painted, pair.inputs = labels, before.inputs
    pair.ignore, pair.foreground, pair.separation, pair.encoded = ignore, foreground, term, encoded
    return pair


class CropSampler:
    """Random training crops: input-sized windows (mirrored at image borders) around annotated
    pixels; with probability ``correction_share`` around corrected pixels instead."""

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        input_size: int,
        rng: np.random.Generator,
        correction_share: float = CORRECTION_SHARE,
        replay: Sequence[TrainingPair] = (),
        replay_share: float = 0.0,
    ) -> None:
        self.pairs = list(pairs)
        self.size = input_size
        self.rng = rng
        sizes = np.array([p.annotated.size for p in self.pairs], float)
        self.p = sizes / sizes.sum()
        corrected = np.array([p.corrected.size for p in self.pairs], float)
        self.p_corrected = corrected / corrected.sum() if corrected.sum() else None
        self.correction_share = correction_share if self.p_corrected is not None else 0.0
        self.replay = list(replay)
        self.replay_share = replay_share if self.replay else 0.0

    def centre(self) -> tuple[TrainingPair, int, int]:
        """A pair and a crop centre in it."""
        if self.replay_share and self.rng.random() < self.replay_share:
            pair = self.replay[self.rng.integers(len(self.replay))]
            pool = pair.annotated
        elif self.correction_share and self.rng.random() < self.correction_share:
            pair = self.pairs[self.rng.choice(len(self.pairs), p=self.p_corrected)]
            pool = pair.corrected
        else:
            pair = self.pairs[self.rng.choice(len(self.pairs), p=self.p)]
            pool = pair.annotated
        cy, cx = np.unravel_index(pool[self.rng.integers(pool.size)], pair.target.shape)
        return pair, int(cy), int(cx)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """``(x (B,C,S,S), target (B,S,S), weights (B,S,S), soft (B,K+1,S,S) or None)`` centred
        on annotated pixels; ``soft`` (the pairs' :attr:`TrainingPair.soft`, its last channel 0
        for pairs without) only when some pair has soft targets."""
        c = self.pairs[0].image.shape[0]
        s = self.size
        x = np.empty((batch, c, s, s), np.float32)
        t = np.empty((batch, s, s), np.int64)
        w = np.empty((batch, s, s), np.float32)
        k = next((p.soft.shape[0] for p in self.pairs if p.soft is not None), 0)
        soft = np.zeros((batch, k, s, s), np.float32) if k else None
        for b in range(batch):
            pair, cy, cx = self.centre()
            h, wd = pair.target.shape
            # Jitter the centre so annotated pixels land anywhere in the output, not only its middle.
            cy += int(self.rng.integers(-s // 4, s // 4 + 1))
            cx += int(self.rng.integers(-s // 4, s // 4 + 1))
            rows = reflect_indices(np.arange(cy - s // 2, cy - s // 2 + s), h)
            cols = reflect_indices(np.arange(cx - s // 2, cx - s // 2 + s), wd)
            ix = np.ix_(rows, cols)
            x[b] = pair.image[:, rows][:, :, cols]
            t[b] = pair.target[ix]
            w[b] = pair.weights[ix]
            if soft is not None and pair.soft is not None:
                soft[b] = pair.soft[:, rows][:, :, cols]
        return x, t, w, soft


def augment_batch(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    generator: torch.Generator | None = None,
    gray: bool = True,
    soft: torch.Tensor | None = None,
    scale: float = 0.0,
    invert: float = 0.0,
):
    """Elastic + rotation/flip (+ zoom by up to ``1 + scale``) with one field per sample for image,
    classes and weights (and ``soft`` targets, bilinearly, when given); gray values (polarity
    reversed with probability ``invert``). Returns ``(x, target, weights)``, or
    ``(x, target, weights, soft)`` when ``soft`` is given."""
    b, _, h, w = x.shape
    field_ = displacement_field(b, (h, w), grid=grid, sigma=sigma, generator=generator, device=x.device)
    sgrid = sampling_grid(field_, affine_matrices(b, scale=scale, generator=generator))
    x = warp(x, sgrid, "bicubic")
    target = warp(target[:, None].to(x.dtype), sgrid, "nearest")[:, 0].round().long()
    weights = warp(weights[:, None], sgrid, "bilinear")[:, 0]
    weights = torch.where(target == IGNORE_INDEX, torch.zeros_like(weights), weights)
    if gray:
        x = gray_value_augment(x, generator=generator, invert=invert)
    if soft is None:
        return x, target, weights
    return x, target, weights, warp(soft, sgrid, "bilinear")


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, soft: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's energy: weight-map-weighted softmax cross-entropy, averaged over annotated pixels.

    With ``soft`` (``(B, K + 1, H, W)``: class probabilities, then a mask), pixels whose mask is
    above 0.5 are trained towards those probabilities (cross-entropy with soft targets) instead
    of their class in ``target``."""
    valid = target != IGNORE_INDEX
    logits = logits.float()
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    if soft is not None:
        towards = -(soft[:, :-1] * F.log_softmax(logits, 1)).sum(1)
        ce = torch.where(soft[:, -1] > 0.5, towards, ce)
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


def painted_slices(labels, previous=None, ignore_value: int | None = None, among: Sequence[int] | None = None) -> list[int]:
    """The slices of a stack's ``labels`` (``(Z, Y, X)``) to train on, of ``among`` (all by
    default): with ``previous`` (the labels the model gave), the slices the user changed, if
    any; else the slices holding anything painted (an object, or, with ``ignore_value``, any
    pixel not marked "not annotated"). A stack is usually painted a few slices at a time, and
    an unpainted slice of zeros would teach that it holds no objects."""
    some = among is not None and len(among) < labels.shape[0]  # an update of some slices only
    among = range(labels.shape[0]) if among is None else among
    changed, painted = [], []
    for z in among:
        plane = np.asarray(labels[z])
        if previous is not None and not np.array_equal(plane, np.asarray(previous[z])):
            changed.append(z)
        if (plane != ignore_value).any() if ignore_value is not None else plane.any():
            painted.append(z)
    if previous is not None and (changed or some):
        return changed  # (of an update of some slices, none changed: nothing of them to train)
    return painted


def axes_per_image(axes: str | Sequence[str | None] | None, n: int, what: str = "images") -> list:
    """``axes`` (what a stack's first axis is) as one entry per image: one for every image
    (a string or None), or a sequence of ``n``; InputError for a sequence of another length."""
    if axes is None or isinstance(axes, str):
        return [axes] * n
    if len(axes) != n:
        raise InputError(f"{n} {what} but {len(axes)} axes")
    return list(axes)


def planes_of(images: Sequence, labels: Sequence, channel_axis: int | None = None,
              axes: str | Sequence[str | None] | None = None) -> tuple[list, list]:
    """``images`` and ``labels`` with each stack replaced by its slices holding objects (for
    validation pairs), each a :class:`~napari_unet_studio.layout.Window` of its stack, so that
    it is normalised as :func:`~napari_unet_studio.segment` normalises it (``axes``: one for
    every stack or one per image, as for :func:`train`); 2-D pairs as they are."""
    axes = axes_per_image(axes, len(images), "validation images")
    out_images, out_labels = [], []
    for image, lab, ax in zip(images, labels, axes):
        layout = ImageLayout(image, channel_axis)
        if not layout.is_stack:
            out_images.append(image)
            out_labels.append(lab)
            continue
        lab = np.asarray(lab)
        if lab.shape != layout.spatial_shape:
            raise InputError(f"validation labels of shape {lab.shape} do not match the stack's {layout.spatial_shape}")
        for z in painted_slices(lab):
            out_images.append(Window(image, z, channel_axis=layout.channel_axis, axes=ax))
            out_labels.append(lab[z])
    return out_images, out_labels


def _learning_rate(base: float, fraction: float, step: int, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``base`` as the run's fraction goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))))


def widen_input(model, in_channels: int = 3):
    """A copy of a one-channel ``model`` that takes RGB (``in_channels=3``) images.

    The first convolution's weights are split over the channels by the luminance coefficients,
    so the copy starts out computing (up to per-channel normalisation) what ``model`` computes
    on the image's luminance, and fine-tuning can then learn to use colour. Everything else,
    the model card with its training history included, is copied.
    """
    if model.in_channels != 1 or in_channels != 3:
        raise ValueError(f"can widen a one-channel model to 3 channels, not {model.in_channels} to {in_channels}")
    wide = build_model(dict(model_config(model), in_channels=in_channels))
    state = model.state_dict()
    first = "encoder.0.0.weight"  # the first convolution (no bias: BatchNorm follows, or zeros)
    state[first] = state[first] * torch.as_tensor(LUMINANCE, dtype=state[first].dtype)[None, :, None, None]
    wide.load_state_dict(state)  # a U-Net++'s prune level is part of its config
    return wide.train(model.training)


def will_widen(model, images: Sequence, channel_axis: int | None = None) -> bool:
    """Whether :func:`train` (with ``widen_for_rgb=True``) widens ``model`` for ``images``:
    a one-channel model and only RGB(A) images."""
    if model.in_channels != 1 or not len(images):
        return False
    return all(ImageLayout(im, channel_axis).n_channels in (3, 4) for im in images)


def _finite(x: float) -> bool:
    return math.isfinite(x)


class Score(tuple):
    """``(AP@0.5, AP@0.5:0.95)`` of some weights (compared as a tuple: the second number breaks
    ties), with the post-processing settings they were scored with in ``postprocess``."""

    postprocess: dict | None
    parts: dict  # what was scored -> its AP@0.5 ("validation", "held-out objects", "corrections")

    def __new__(cls, ap50: float, ap50_95: float, postprocess: dict | None = None, parts: dict | None = None):
        score = super().__new__(cls, (float(ap50), float(ap50_95)))
        score.postprocess = postprocess
        score.parts = dict(parts or {})
        return score


_UNMEASURED = object()
#: Why a run held nothing out, in the words the dock and the command line show.
HOLDOUT_SKIPPED = "the images are unlike the model's training data, so its own labels were not held out to judge it"


class TrainingSession:
    """A step-wise trainer whose (image, labels) pairs can change while it runs.

    The same object serves a fixed run (:func:`train`), the Fine-tune dock and live mode:
    pairs are set by key (:meth:`set_pair`; setting a key again replaces that pair, as when the
    user paints more) from any thread and are prepared by the training thread before its next
    step; :meth:`run` trains for a number of steps or seconds; :meth:`segment` labels a region
    with the current weights; :meth:`finish` hands back the model with the best weights seen.

    Parameters
    ----------
    model
        The network to train (trained in place; pass a copy to keep the original).
    holdout
        With no validation pairs, hold out ~15 % of the painted objects (at least 8 objects in
        all, at most 20 held out) and keep the weights that segment them, and the objects around
        the corrections, best (AP@0.5). With a validation pair, or 10 or more held-out objects,
        the weights before training compete too, so the result is never worse on them. Pairs
        given with the labels the model gave (``previous``) on an image the model finds
        unfamiliar hold nothing out (the objects that could be are the model's own, no truth
        there); the corrections alone choose.
    correction_share, correction_weight
        Share of crops centred on corrected pixels, and their extra loss weight (pairs given
        with ``previous`` labels).
    replay, replay_share
        Optional ``(image, labels)`` pairs of what the model already knows (e.g. a sample of
        its training data), from which ``replay_share`` of the crops are drawn, against
        forgetting; never held out, never counted as corrections.
    distill
        Off by default (measured: no gain, see the README). For pairs given with ``previous``
        labels: where the user left the model's labels as they were, train towards the starting model's probabilities (soft targets) rather than its
        thresholded labels, so what was right stays right, as confident as it was; the
        corrections (and the outlines and gaps of the objects they touch) train on the painted
        labels as usual.
    tune_postprocess
        Off by default (measured: helped on one pair of images, hurt on another). When weights
        are chosen by AP (validation or held-out objects), score each with the
        post-processing settings that suit it best (a small grid around the model's own, see
        :func:`~napari_unet_studio.postprocess.candidate_options`) and hand the model back with
        the settings chosen with its weights.
    keep_norm_statistics
        Keep BatchNorm's running statistics fixed (its scale and shift still learn), so a few
        painted images do not re-estimate what the model learnt from many.
    scale
        The network sees every pair (and validation pair) resized by this factor (labels by the
        nearest pixel); :meth:`segment` resizes back. See :mod:`~napari_unet_studio.rescale`.
    fit_threads
        On the CPU, fit torch's threads to the cores other programs leave free while training
        (:class:`~napari_unet_studio.devices.ThreadFitter`); ``reserve_cores`` keeps that many
        free for other work in this process (napari drawing, in live mode).
    Other parameters as for :func:`train`.
    """

    def __init__(
        self,
        model,
        *,
        seed: int | None = None,
        batch_size: int = 2,
        tile_size: int | None = None,
        lr: float | None = None,
        weight_decay: float = 1e-5,
        optimizer: str = "adam",
        schedule: str = "cosine",
        fine_tune: bool | None = None,
        freeze_encoder: bool = False,
        ignore_value: int | None = None,
        w0: float = 10.0,
        sigma: float = 5.0,
        deep_supervision: bool = True,
        dice_weight: float = 0.0,
        augment: bool | dict = True,
        device=None,
        channel_axis: int | None = None,
        holdout: bool = True,
        correction_share: float = CORRECTION_SHARE,
        correction_weight: float = CORRECTION_WEIGHT,
        val_images: Sequence | None = None,
        val_labels: Sequence | None = None,
        val_axes: str | Sequence[str | None] | None = None,
        fit_threads: bool = True,
        replay: Sequence | None = None,
        replay_share: float = REPLAY_SHARE,
        keep_norm_statistics: bool = False,
        reserve_cores: int = 0,
        tune_postprocess: bool = False,
        distill: bool = False,
        scale: float = 1.0,
    ) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch size must be a positive whole number, got {batch_size!r}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed must be a non-negative whole number, got {seed!r}")
        if tile_size is not None and (not isinstance(tile_size, (int, np.integer)) or tile_size < 1):
            raise InputError(f"tile size must be a positive whole number, got {tile_size!r}")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise InputError(f"learning rate must be a positive number, got {lr}")
        if not 0 <= correction_share <= 1:
            raise InputError(f"correction share must be in [0, 1], got {correction_share}")
        self.model = model
        self.scale = check_scale(scale)
        self._scaled: dict = {}  # key -> {"image": (original, resampled), "previous": (...)}
        self.device = resolve_device(device)
        self.fine_tune = bool(card_of(model).provenance.get("training")) if fine_tune is None else bool(fine_tune)
        # A fine-tune's learning rate, when not given, is chosen when the first pairs are
        # prepared: gentler on images the model finds familiar (see _measure_familiarity).
        self._lr_given = lr is not None
        self._unfamiliar = _UNMEASURED  # is_unfamiliar() of the first image: True, False or None (no record)
        self._untrusted_holdout = False  # objects were not held out: the model's own labels, unfamiliar image
        self.lr = lr if lr is not None else (FINE_TUNE_LR if self.fine_tune else 1e-3)
        self.batch_size = batch_size
        self.schedule = schedule
        self.freeze_encoder = freeze_encoder
        self.ignore_value = ignore_value
        self.w0, self.sigma = w0, sigma
        self.dice_weight = dice_weight
        if isinstance(augment, dict):
            unknown = set(augment) - {"scale", "invert"}
            if unknown:
                raise InputError(f"unknown augmentation options {sorted(unknown)} (known: scale, invert)")
        self.augment = augment
        self.channel_axis = channel_axis
        self.holdout = holdout
        self.correction_share = correction_share
        self.correction_weight = correction_weight
        self.seed = seed
        self.fit_threads = fit_threads
        self.keep_norm_statistics = keep_norm_statistics
        self.reserve_cores = reserve_cores
        self.tune_postprocess = tune_postprocess
        self.distill = distill
        self._start_model = None  # a frozen copy of the starting weights, for soft targets
        self._soft_cache: dict = {}  # key -> (image, starting probabilities)
        self._initial_postprocess = dict(card_of(model).postprocess)
        from .checkpoint import fingerprint

        self._parent = fingerprint(model)[:16]  # the version this run starts from
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        self._torch_state = None
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._torch_state = torch.get_rng_state()
        geometry = Geometry(model.depth)
        self.tile_size = geometry.valid_input(tile_size) if tile_size else geometry.input_for_output(DEFAULT_CROP_OUTPUT)
        self.out_size = geometry.output_size(self.tile_size)

        self.validation = None
        if val_images is not None and len(val_images):
            if val_labels is None or len(val_labels) != len(val_images):
                raise InputError("give one validation label image per validation image")
            val_images, val_labels = planes_of(val_images, val_labels, channel_axis, val_axes)
            self.validation = (
                [self._at_scale(None, "", im, 1) for im in val_images],
                [as_instances(self._at_scale(None, "", np.asarray(v), 0)) for v in val_labels],
            )

        self._prune_level = getattr(model, "prune_level", None)
        if self._prune_level is not None:
            model.prune_level = None
        model.to(self.device)
        if freeze_encoder:
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=self.lr, momentum=0.99, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.Adam(params, lr=self.lr, weight_decay=weight_decay)
        self.cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        self.deep = deep_supervision and hasattr(model, "forward_deep")

        self.pairs: dict[Hashable, TrainingPair] = {}
        self.replay_share = replay_share
        self.replay = [
            prepare_pair(model, im, lab, w0=w0, sigma=sigma, channel_axis=channel_axis) for im, lab in (replay or [])
        ]
        self._pending: dict[Hashable, dict | None] = {}
        self._stacks: dict = {}  # stack key -> (its image, its axes, {z: its Window}, the slices trained on)
        self._statistics: dict = {}  # normalisation statistics of the images that windows are part of
        self._lock = threading.Lock()
        self._sampler: CropSampler | None = None
        self.step_count = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.ema: float | None = None
        self.best = {"score": -math.inf, "state": None, "step": 0}
        self._initial = copy.deepcopy(model.state_dict())
        self._scored_initial = False
        self._best_is_stale = False
        self._last_val = time.perf_counter()
        self.stopped = "steps"

    # -- pairs -----------------------------------------------------------------------------
    def set_pair(self, key: Hashable, image, labels, *, region=None, previous=None, name: str | None = None,
                 slices: Sequence[int] | None = None, axes: str | None = None) -> None:
        """Add the pair ``key``, or replace it (the user painted more). Thread-safe; the pair is
        prepared by the training thread before its next step (or by :meth:`prepare`). ``name``
        (a file or layer name; ``key`` by default) is what the run's record calls the image.

        A stack (``(Z, Y, X)``, optionally with channels; ``labels``, ``previous`` and
        ``region`` of its spatial shape, ``region`` also 2-D for every slice) trains on its
        painted slices (:func:`painted_slices`), each a 2-D pair of its own, keyed
        ``(key, z)`` and named ``"name [z]"``. ``slices`` limits an update to those slices (the
        user painted on them): only they are looked at, copied and prepared again. Each slice is
        normalised as :func:`~napari_unet_studio.segment` normalises it: with the statistics of
        the whole volume (``axes="ZYX"``, the default), or of its frame (``"TYX"``). So is an
        :class:`~napari_unet_studio.inference.Window` (a region of a larger image): with that
        image's statistics."""
        layout = ImageLayout(image, self.channel_axis)
        if layout.is_stack:
            self._set_stack(key, layout, labels, region, previous, str(key) if name is None else str(name), slices, axes)
            return
        labels = np.array(labels)  # a copy: the user may keep painting the layer
        with self._lock:
            self._pending[key] = {"image": image, "labels": labels, "region": region, "previous": previous,
                                  "name": str(key) if name is None else str(name)}

    def _set_stack(self, key, layout: ImageLayout, labels, region, previous, name: str, slices, axes) -> None:
        """:meth:`set_pair` for a stack: its painted slices become 2-D pairs ``(key, z)``."""
        if layout.channel_axis is not None and layout.channel_axis != len(layout.shape) - 1:
            raise InputError(f"a stack to train on needs its channels last, got shape {layout.shape} "
                             f"with channels on axis {layout.channel_axis}")
        labels = labels if hasattr(labels, "shape") else np.asarray(labels)
        for what, array in (("labels", labels), ("previous labels", previous)):
            if array is not None and tuple(array.shape) != layout.spatial_shape:
                raise InputError(f"{what} of shape {tuple(array.shape)} do not match the stack's {layout.spatial_shape}")
        if region is not None:
            region = np.asarray(region, bool)
            if region.shape not in (layout.spatial_shape, layout.plane):
                raise InputError(f"region mask of shape {region.shape} does not match the stack's "
                                 f"{layout.spatial_shape} (or one slice's {layout.plane})")
        axes = stack_axes(axes, True)  # "ZYX" or "TYX", checked before anything changes
        with self._lock:
            known = self._stacks.get(key)
        done = set(known[3]) if known is not None else set()
        views = known[2] if known is not None and known[0] is layout.image and known[1] == axes else {}
        n = layout.n_slices
        look = range(n) if slices is None else sorted({int(z) for z in slices if 0 <= int(z) < n})

        def to_train(among):  # painted, and (regions drawn on some slices) inside a region
            found = set(painted_slices(labels, previous, self.ignore_value, among))
            return found if region is None or region.ndim == 2 else {z for z in found if region[z].any()}

        keep = to_train(look)
        if slices is not None and not (done - set(look)) | keep:  # nothing left: look at the whole stack
            look = range(n)
            keep = to_train(look)
        if not keep and not done - set(look):
            raise InputError(f"{name}: no slice of the stack is painted (no objects"
                             + (", nothing marked other than 'not annotated'" if self.ignore_value is not None else "")
                             + ("" if previous is None else ", no change from the model's labels")
                             + ("" if region is None or region.ndim == 2 else " inside the regions") + ")")
        for z in look:
            if z in keep:
                if z not in views:
                    views[z] = Window(layout.image, z, channel_axis=layout.channel_axis, axes=axes)
                plane = region if region is None or region.ndim == 2 else region[z]
                self.set_pair((key, z), views[z], np.array(labels[z]), region=plane,
                              previous=None if previous is None else np.asarray(previous[z]), name=f"{name} [{z}]")
            elif z in done:
                self.remove_pair((key, z))
        done = (done - set(look)) | keep
        with self._lock:
            self._stacks[key] = (layout.image, axes, views, done)

    def _at_scale(self, key, what: str, array, order: int):
        """``array`` (an image, labels or a mask) as the network sees it at the session's scale;
        an image or previous labels given again for ``key`` are resampled once."""
        if array is None or self.scale == 1:
            return array
        cache = self._scaled.setdefault(key, {}) if key is not None and what else {}
        hit = cache.get(what)
        if hit is not None and hit[0] is array:
            return hit[1]
        layout = ImageLayout(array, self.channel_axis if order else None)
        if layout.is_stack:
            raise InputError(f"training takes 2-D images (or 2-D with channels), got shape {layout.shape}")
        axes = layout.spatial_axes
        resampled = rescale_plane(np.asarray(array), self.scale, order=order, axes=(axes[-2], axes[-1]))
        if what:
            cache[what] = (array, resampled)
        return resampled

    def remove_pair(self, key: Hashable) -> None:
        """Stop training on the pair ``key`` (a stack: all its slices; from the next step on).
        Thread-safe."""
        with self._lock:
            stack = self._stacks.pop(key, None)
            for sub in [key] if stack is None else [(key, z) for z in stack[3]]:
                self._pending[sub] = None

    def prepare(self) -> list[Hashable]:
        """Prepare the pairs set since the last step; returns their keys. Raises
        :class:`~.errors.InputError` for a pair that cannot be trained on (it is not added)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return []
        for key, item in pending.items():
            if item is None:
                self.pairs.pop(key, None)
                self._soft_cache.pop(key, None)
                self._scaled.pop(key, None)
                continue
            original_image = item["image"]
            item = {**item, "image": self._at_scale(key, "image", item["image"], 1),
                    "labels": self._at_scale(key, "", item["labels"], 0),
                    "previous": self._at_scale(key, "previous", item["previous"], 0),
                    "region": self._at_scale(key, "", item["region"], 0)}
            # The hold-out is chosen once, from the first labels of each pair: its objects stay
            # out of training when the pair is replaced.
            old = self.pairs.get(key)
            size = self._holdout_size(item["labels"]) if old is None else 0
            wants_lr = self.fine_tune and not self._lr_given
            wants_holdout = size > 0 and item["previous"] is not None
            if self._unfamiliar is _UNMEASURED and (wants_lr or wants_holdout):
                self._measure_familiarity(item["image"])
                if wants_lr:
                    self.lr = FAMILIAR_LR if self.familiar else FINE_TUNE_LR
            # With the labels the model gave, the objects that could be held out are the ones the
            # user left as the model drew them: on images the model does not know they are no
            # truth to choose by (measured on stained tissue: their AP fell to 0 while AP on other
            # images of the kind rose), so the corrections alone choose there.
            trusted = item["previous"] is None or self._unfamiliar is not True
            holdout = size if trusted else 0
            self._untrusted_holdout |= wants_holdout and not trusted
            pair = prepare_pair(
                self.model,
                item["image"],
                item["labels"],
                region=item["region"],
                previous=item["previous"],
                ignore_value=self.ignore_value,
                w0=self.w0,
                sigma=self.sigma,
                channel_axis=self.channel_axis,
                correction_weight=self.correction_weight,
                holdout=holdout,
                check_corrections=self.holdout and self.validation is None,
                rng=self.rng,
                before=old,
                statistics=original_image.statistics(self.model, self._statistics) if isinstance(original_image, Window) else None,
            )
            if old is not None and old.holdout is not None:
                held = old.holdout
                keep = np.ones(pair.target.shape, bool)
                keep[held.window] &= ~held.scored
                pair.target[~keep] = IGNORE_INDEX
                pair.weights[~keep] = 0
                pair.annotated = np.flatnonzero(pair.target.ravel() != IGNORE_INDEX)
                pair.corrected = pair.corrected[keep.ravel()[pair.corrected]]
                pair.holdout = held
            if self.distill and pair.corrections is not None:
                pair.soft = self._soft_targets(key, item["image"], pair)
            pair.record = image_record(item["name"], original_image, item["labels"], self.ignore_value)
            self.pairs[key] = pair
        self._sampler = None
        self._best_is_stale = self.best["state"] is not None  # scored on other regions than the next checkpoint
        return list(pending)

    def _measure_familiarity(self, image) -> None:
        """Whether the first image is familiar to the model (its uncertainty within what its
        card records): a familiar kind is fine-tuned gently (:data:`FAMILIAR_LR`, else
        :data:`FINE_TUNE_LR`, also when the card has no record), and on an unfamiliar one the
        model's own labels are not held out to choose the weights."""
        from .inference import image_uncertainty, is_unfamiliar

        value = image_uncertainty(self.model, image, channel_axis=self.channel_axis, device=self.device)
        self._unfamiliar = is_unfamiliar(self.model, value)

    @property
    def familiar(self) -> bool | None:
        """Whether the first image was found familiar to the model (False also when its card has
        no record to tell); None when it was not measured (a given learning rate, nothing held out)."""
        return None if self._unfamiliar is _UNMEASURED else self._unfamiliar is False

    def _soft_targets(self, key, image, pair: TrainingPair) -> np.ndarray:
        """The starting model's probabilities on ``image`` (predicted once per image), with a
        last channel marking the annotated pixels the user left as the model gave them."""
        from .inference import predict

        cached = self._soft_cache.get(key)
        if cached is None or cached[0] is not image:
            if self._start_model is None:
                self._start_model = copy.deepcopy(self.model).eval()
                self._start_model.load_state_dict(self._initial)
                for p in self._start_model.parameters():
                    p.requires_grad_(False)
            probs = predict(self._start_model, image, device=self.device, channel_axis=self.channel_axis)
            cached = self._soft_cache[key] = (image, probs.astype(np.float16))
        unedited = ~pair.corrections.mask & (pair.target != IGNORE_INDEX)
        return np.concatenate([cached[1], unedited[None].astype(np.float16)])

    def _holdout_size(self, labels) -> int:
        if not self.holdout or self.validation is not None:
            return 0
        labels = np.asarray(labels)
        values = labels[labels > 0] if self.ignore_value is None else labels[(labels > 0) & (labels != self.ignore_value)]
        n = len(np.unique(values))
        if labels.dtype == bool or n == 1:
            n = int(as_instances(labels).max())
        if n < HOLDOUT_MIN_OBJECTS:
            return 0
        return int(min(HOLDOUT_MAX_OBJECTS, max(1, round(HOLDOUT_FRACTION * n))))

    @property
    def holdout_objects(self) -> int:
        """Number of painted objects held out to choose the best weights."""
        return sum(p.holdout.n_objects for p in self.pairs.values() if p.holdout is not None)

    def _ensure_sampler(self) -> CropSampler:
        if self._sampler is None:
            if not self.pairs:
                raise InputError("no training images")
            if not any((p.target > 0).any() for p in self.pairs.values()):
                raise InputError("the labels contain no objects")
            self._sampler = CropSampler(list(self.pairs.values()), self.tile_size, self.rng, self.correction_share,
                                        self.replay, self.replay_share)
        return self._sampler

    # -- steps -----------------------------------------------------------------------------
    def step(self, lr: float | None = None) -> dict:
        """One optimiser step; returns its record (``step``, ``loss``, ``lr``)."""
        self.prepare()
        sampler = self._ensure_sampler()
        model, device = self.model, self.device
        lr = self.lr if lr is None else lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        model.train()
        if self.freeze_encoder:
            model.encoder.eval()  # frozen means its BatchNorm statistics too
        if self.keep_norm_statistics:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
        x, t, w, soft = (None if a is None else torch.from_numpy(a).to(device) for a in sampler.sample(self.batch_size))
        if self.augment:
            more = self.augment if isinstance(self.augment, dict) else {}
            x, t, w, *rest = augment_batch(x, t, w, generator=self.generator, soft=soft, **more)
            soft = rest[0] if rest else None
        t, w = _center(t, self.out_size), _center(w, self.out_size)
        soft = None if soft is None else _center(soft, self.out_size)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            outputs = model.forward_deep(x) if self.deep else [model(x)]
        loss = sum(weighted_cross_entropy(o, t, w, soft) for o in outputs) / len(outputs)
        if self.dice_weight:
            loss = loss + self.dice_weight * sum(soft_dice_loss(o, t) for o in outputs) / len(outputs)
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"step": self.step_count, "loss": value, "lr": lr, "diverged": True}
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        self.ema = value if self.ema is None else 0.95 * self.ema + 0.05 * value
        return {"step": self.step_count, "loss": value, "lr": lr}

    def _diverged(self) -> None:
        """Non-finite loss: go back to the best (or the initial) finite weights."""
        state = self.best["state"] if self.best["state"] is not None else self._initial
        step = self.best["step"] if self.best["state"] is not None else 0
        self.model.load_state_dict(state)
        self.best = dict(self.best, state=state, step=step)
        self.stopped = "diverged"

    def run(
        self,
        *,
        steps: int | None = None,
        time_budget: float | None = None,
        progress: Callable[[dict], object] | None = None,
        cancel: Callable[[], bool] | None = None,
        val_every: int | None = None,
        val_seconds: float | None = None,
        final_check: bool = True,
    ) -> str:
        """Train for ``steps`` optimiser steps and/or ``time_budget`` seconds (whichever ends
        first; with neither, until ``cancel`` returns True). Returns why it stopped:
        ``"steps"``, ``"time"``, ``"cancelled"`` or ``"diverged"``.

        The best weights are chosen every ``val_every`` steps or ``val_seconds`` seconds
        (default: a tenth of the run) and at the end: by AP@0.5 on the validation pairs or the
        held-out objects, else by the smoothed loss. ``progress`` gets each step's record:
        ``step``, ``steps``, ``loss``, ``lr``, ``elapsed``, ``fraction`` and after a
        validation ``val_ap50`` (``val_source``: ``"validation"``, or what :attr:`chosen_by` says).
        With ``final_check=False`` the weights at the end are not scored (runs that continue
        one another, as in :meth:`live`, keep the ``val_seconds`` rhythm across calls).
        """
        if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 0):
            raise InputError(f"steps must be a whole number >= 0, got {steps!r}")
        if val_every is not None and (not isinstance(val_every, (int, np.integer)) or val_every < 1):
            raise InputError(f"val_every must be a positive whole number, got {val_every!r}")
        if val_seconds is not None and not (math.isfinite(val_seconds) and val_seconds > 0):
            raise InputError(f"val_seconds must be a positive number of seconds, got {val_seconds!r}")
        if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
            raise InputError(f"the time budget must be a positive number of seconds, got {time_budget}")
        self.prepare()
        self._ensure_sampler()
        if val_every is None and val_seconds is None:
            if steps is not None:
                val_every = max(25, steps // 10)
            else:
                val_seconds = (time_budget or 100.0) / 8
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.cuda else []):
            if self._torch_state is not None:
                torch.set_rng_state(self._torch_state)
            fitter = ThreadFitter(reserve=self.reserve_cores) if self.device.type == "cpu" and self.fit_threads else None
            try:
                self.stopped = self._loop(steps, time_budget, progress, cancel, val_every, val_seconds, final_check, fitter)
            finally:
                if fitter is not None:
                    fitter.restore()
                if self._torch_state is not None:
                    self._torch_state = torch.get_rng_state()
        return self.stopped

    def live(
        self,
        view: Callable[[], tuple[object, tuple[slice, slice]] | None],
        *,
        cancel: Callable[[], bool],
        progress: Callable[[dict], object] | None = None,
        chunk: float = 3.0,
        val_seconds: float = 15.0,
    ):
        """Train until ``cancel`` returns True, segmenting what the user looks at as it goes.

        A generator (for a napari worker): every ``chunk`` seconds of training (longer when
        segmenting the view takes over a third of that, so that previews take at most a quarter
        of the time) it calls
        ``view()`` for ``(image, (rows, cols))``, the image and region in view (or None), and
        yields ``{"step", "image", "window", "labels"}`` with that region segmented by the current
        weights. Pairs set meanwhile (:meth:`set_pair`) are trained on from the next step.
        The best weights are chosen every ``val_seconds``; returns :meth:`finish`'s model.
        """
        seconds = chunk
        while not cancel():
            stopped = self.run(time_budget=seconds, cancel=cancel, progress=progress, val_seconds=val_seconds,
                               final_check=False)
            if stopped in ("cancelled", "diverged"):
                break
            seen = view()
            if seen is not None:
                image, window = seen
                start = time.perf_counter()
                labels = self.segment(image, window=window)
                # Previews take at most a quarter of the time: a large view trains longer between them.
                seconds = max(chunk, 3 * (time.perf_counter() - start))
                yield {"step": self.step_count, "image": image, "window": window, "labels": labels}
        # Live training ends when the user stops it (or the loss diverges), also when the stop
        # came while a preview was made: the last chunk's "time" is not why it ended.
        if self.stopped != "diverged":
            self.stopped = "cancelled"
        if self.step_count and self.history and "val_ap50" not in self.history[-1]:
            self._checkpoint(self.history[-1])
        return self.finish(live=True)

    def _loop(self, steps, time_budget, progress, cancel, val_every, val_seconds, final_check, fitter) -> str:
        if not self._scored_initial and self.scored and (self.validation is not None or self.holdout_objects >= HOLDOUT_TRUSTED):
            self._consider(self.scores(), step=self.step_count)
            self._scored_initial = True
        start = time.perf_counter()
        done = 0
        stopped = "steps"
        record = None
        checked = False
        last_val = self._last_val if val_seconds and not final_check else start
        while True:
            elapsed = time.perf_counter() - start
            if steps is not None and done >= steps:
                break
            if time_budget is not None and elapsed >= time_budget:
                stopped = "time"
                break
            if cancel is not None and cancel():
                stopped = "cancelled"
                break
            if fitter is not None:
                fitter.update()
            fraction = max(done / steps if steps else 0.0, elapsed / time_budget if time_budget else 0.0)
            lr = _learning_rate(self.lr, fraction if self.schedule == "cosine" else 0.0, self.step_count)
            record = self.step(lr)
            if record.get("diverged"):
                self._diverged()
                stopped = "diverged"
                break
            done += 1
            now = time.perf_counter()
            record.update(
                steps=steps,
                elapsed=now - start,
                fraction=min(1.0, max(done / steps if steps else 0.0, (now - start) / time_budget if time_budget else 0.0)),
            )
            checked = bool((val_every and done % val_every == 0) or (val_seconds and now - last_val >= val_seconds))
            if checked:
                self._checkpoint(record)
                last_val = self._last_val = time.perf_counter()
            self.history.append(record)
            if progress is not None:
                progress(record)
        self.seconds += time.perf_counter() - start
        # The final weights count too (diverged ones were replaced by the best already).
        if final_check and record is not None and not checked and stopped != "diverged":
            self._checkpoint(record)
            if "val_ap50" in record and progress is not None:
                progress(record)  # the same step again, now with its validation score
        return stopped

    @property
    def scored(self) -> bool:
        """Whether weights are chosen by AP@0.5 (validation pairs or held-out objects)."""
        return self.validation is not None or any(p.holdout is not None or p.checks for p in self.pairs.values())

    @property
    def chosen_by(self) -> str:
        """What chooses the best weights, in words: ``"validation"``, ``"held-out objects"``,
        ``"corrections"``, both of the last two, or ``"training loss"``."""
        if self.validation is not None:
            return "validation"
        parts = [name for name, n in (("held-out objects", self.holdout_objects),
                                      ("corrections", sum(len(p.checks) for p in self.pairs.values()))) if n]
        return " and ".join(parts) if parts else "training loss"

    def _rescore_best(self) -> None:
        """Score the best weights again on the current regions (pairs changed since)."""
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.best["state"])
        key = self.scores()
        self.best.update(score=key[0], key=key, postprocess=getattr(key, "postprocess", None))
        self.model.load_state_dict(current)
        self._best_is_stale = False

    def _checkpoint(self, record: dict) -> None:
        if self._best_is_stale and self.scored:
            self._rescore_best()
        if self.scored:
            key = self.scores()
            record["val_ap50"] = key[0]
            record["val_source"] = self.chosen_by
            record["val_parts"] = getattr(key, "parts", {})
        else:
            key = (-(self.ema if self.ema is not None else math.inf), 0.0)
        self._consider(key, self.step_count)
        record["best_step"] = self.best["step"]

    def _consider(self, key: tuple[float, float], step: int) -> None:
        # Equal AP@0.5 is decided by AP@0.5:0.95 (better outlines); full ties go to the later
        # weights: they have seen the corrections longer.
        if _finite(key[0]) and key >= self.best.get("key", (-math.inf, -math.inf)):
            self.best = {"score": key[0], "key": key, "state": copy.deepcopy(self.model.state_dict()), "step": step,
                         "postprocess": getattr(key, "postprocess", None)}

    def score(self) -> float:
        """AP@0.5 of the current weights on what chooses the weights (see :meth:`scores`)."""
        return self.scores()[0]

    def scores(self) -> Score:
        """``(AP@0.5, AP@0.5:0.95)`` of the current weights on the validation pairs; without
        them, the mean over the held-out objects and the objects around the corrections (each
        averaged over regions, weighted by their objects): what was right stays right, and
        what was painted is learned. The second number breaks ties of the first.

        Each weights are scored with the post-processing settings that suit them best among
        :func:`~napari_unet_studio.postprocess.candidate_options` (the model's own first, kept on
        ties): fine-tuning sharpens the probabilities, which moves the best threshold. The
        result is a :class:`Score`: its ``postprocess`` holds the settings behind it."""
        from .metrics import COCO_THRESHOLDS, average_precision
        from .postprocess import candidate_options, labels_from_probabilities, options_for

        current = options_for(self.model)
        candidates = candidate_options(card_of(self.model).encoding, current) if self.tune_postprocess else [current]

        def mean_aps(preds, truths, weights=None):
            aps = [average_precision(p, t, COCO_THRESHOLDS) for p, t in zip(preds, truths)]
            return (float(np.average([a[0.5] for a in aps], weights=weights)),
                    float(np.average([np.mean(list(a.values())) for a in aps], weights=weights)))

        # parts -> [(probabilities, truth, scored area or None, weight)]; predicted once.
        parts = []  # (name, items)
        if self.validation is not None:
            parts.append(("validation", [(self._probabilities(im), lab, None, 1) for im, lab in zip(*self.validation)]))
        else:
            for name, regions_of in (("held-out objects", lambda pair: [pair.holdout] if pair.holdout is not None else []),
                                     ("corrections", lambda pair: pair.checks)):
                items = [(self._probabilities(pair.source, r.window), r.truth, r.scored, max(r.n_objects, 1))
                         for pair in self.pairs.values() for r in regions_of(pair)]
                if items:
                    parts.append((name, items))
        if not parts:
            return Score(-math.inf, -math.inf, current)
        best_key, best_options, best_parts = (-math.inf, -math.inf), current, {}
        for options in candidates:
            keys = []
            for _, items in parts:
                preds = []
                for probs, _, scored, _ in items:
                    pred = labels_from_probabilities(probs, encoding=card_of(self.model).encoding, **options)
                    if scored is not None:
                        # Predicted objects that lie mostly in the scored area are scored.
                        ids, inside = np.unique(pred[scored], return_counts=True)
                        sizes = np.bincount(pred.ravel())
                        keep = ids[(ids > 0) & (inside >= 0.5 * sizes[ids])]
                        pred = np.where(np.isin(pred, keep), pred, 0)
                    preds.append(pred)
                keys.append(mean_aps(preds, [i[1] for i in items], [i[3] for i in items]))
            key = (float(np.mean([k[0] for k in keys])), float(np.mean([k[1] for k in keys])))
            if key > best_key:  # strictly better: ties keep the earlier (the model's own) settings
                best_key, best_options, best_parts = key, options, {name: k[0] for (name, _), k in zip(parts, keys)}
        return Score(*best_key, best_options, best_parts)

    def _probabilities(self, image, window=None) -> np.ndarray:
        from .inference import predict

        return predict(self.model, image, device=self.device, channel_axis=self.channel_axis, window=window)

    # -- results ---------------------------------------------------------------------------
    def segment(self, image, *, window=None, **options):
        """Labels of ``image`` (optionally a ``(rows, cols)`` window of it) with the current
        weights, as :func:`~napari_unet_studio.segment` gives them. Call it from the training
        thread (between :meth:`run` calls)."""
        from .inference import segment

        return segment(self.model, image, device=self.device, channel_axis=self.channel_axis, window=window,
                       scale=self.scale, **options)

    def best_model(self):
        """A copy of the model with the best weights so far, ready to segment (eval mode)."""
        model = copy.deepcopy(self.model)
        if self.best["state"] is not None:
            model.load_state_dict(self.best["state"])
        self._restore(model)
        return model

    def _restore(self, model) -> None:
        if self.best.get("postprocess") is not None:
            from .postprocess import OPTIONS

            card_of(model).postprocess = {k: v for k, v in self.best["postprocess"].items() if k in OPTIONS}
        for p in model.parameters():
            p.requires_grad_(True)
        if self._prune_level is not None:
            model.prune_level = self._prune_level
        model.eval()

    def finish(self, **extra) -> object:
        """The model with the best weights seen, in eval mode, with this run in its provenance
        (``extra`` entries are added to the run's record)."""
        model = self.model
        if self.best["state"] is not None:
            model.load_state_dict(self.best["state"])
        self._restore(model)
        runs = list(card_of(model).provenance.get("training", []))
        run = {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "images": len(self.pairs),
            "data": [pair.record for pair in self.pairs.values()],
            "objects": sum(pair.record.get("objects", 0) for pair in self.pairs.values()),
            "steps": self.step_count,
            "best_step": self.best["step"],
            "seconds": round(self.seconds, 1),
            "stopped": self.stopped,
            "batch_size": self.batch_size,
            "tile_size": self.tile_size,
            "lr": self.lr,
            "fine_tune": self.fine_tune,
            **({"scale": self.scale} if self.scale != 1 else {}),
            **({"familiar": self.familiar} if self.familiar is not None else {}),
            **({"augment": dict(self.augment)} if isinstance(self.augment, dict) else {}),
            "seed": self.seed,
        }
        corrections = [p.corrections for p in self.pairs.values() if p.corrections is not None]
        if corrections:
            run["corrections"] = sum(c.count for c in corrections)
        if self.validation is not None:
            run["val_ap50"] = self.best["score"]
        elif self.scored:
            run["chosen_by"] = self.chosen_by
            run["choice_ap50"] = self.best["score"]
            run["holdout_objects"] = self.holdout_objects
            if self._untrusted_holdout:
                run["holdout_skipped"] = HOLDOUT_SKIPPED
        if card_of(model).postprocess != self._initial_postprocess:
            run["postprocess"] = dict(card_of(model).postprocess)
        run.update(parent=self._parent, package=__version__, hardware=hardware(self.device))
        run.update(extra)
        self._update_uncertainty_reference(model)
        runs.append(run)
        card_of(model).provenance["training"] = runs
        return model


    def _update_uncertainty_reference(self, model) -> None:
        """Images like the ones just painted are now familiar to the model: its card's typical
        uncertainty (see :func:`~napari_unet_studio.inference.unfamiliar`) becomes the larger of
        the old one and the one measured on (up to 3 of) the training images."""
        from .inference import uncertainty_reference

        sources = [p.source for p in self.pairs.values()][:UNCERTAINTY_IMAGES]
        if not sources or self.step_count == 0:
            return
        measured = uncertainty_reference(model, sources, channel_axis=self.channel_axis, device=self.device, max_side=768)
        old = card_of(model).provenance.get("uncertainty") or {"typical": 0.0, "images": 0}
        card_of(model).provenance["uncertainty"] = {"typical": max(float(old["typical"]), measured["typical"]),
                                           "images": int(old["images"]) + measured["images"]}


def train(
    model,
    images: Sequence,
    labels: Sequence,
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    regions: Sequence | None = None,
    previous: Sequence | None = None,
    progress: Callable[[dict], object] | None = None,
    cancel: Callable[[], bool] | None = None,
    val_every: int | None = None,
    widen_for_rgb: bool = True,
    channel_axis: int | None = None,
    names: Sequence[str] | None = None,
    axes: str | Sequence[str | None] | None = None,
    **options,
):
    """Train (or fine-tune) ``model`` on (image, labels) pairs; returns ``(model, history)``.

    A fixed run of :class:`TrainingSession`; keyword arguments not named in the signature
    (``seed``, ``lr``, ``batch_size``, ``holdout``, ...) are the session's, described here.

    Parameters
    ----------
    model
        A :class:`~napari_unet_studio.UNet` or :class:`~napari_unet_studio.UNetPlusPlus`.
    images, labels
        Sequences of 2-D images (any size or dtype, optionally with channels) and their
        instance labels (0 = background; a label image with one non-zero value is a mask whose
        connected components are the objects). A stack (``(Z, Y, X)``, channels last if any)
        with ``(Z, Y, X)`` labels trains on its painted slices (:func:`painted_slices`: with
        ``previous``, the slices the user changed), each normalised as
        :func:`~napari_unet_studio.segment` normalises it (see ``axes``); an
        :class:`~napari_unet_studio.inference.Window` (a region of a larger image) with the
        statistics of that image.
    steps, time_budget
        Stop after this many optimiser steps and/or seconds of training (whichever comes
        first); with neither, 500 steps.
    axes
        What each stack's first axis is, as for :func:`~napari_unet_studio.segment`: ``"ZYX"``
        (the default: slices of a volume, normalised with the volume's statistics) or ``"TYX"``
        (frames, each normalised on its own); one for every stack, or one per image.
    regions
        Optional boolean masks (one per image, or ``None`` entries): train only inside them.
    previous
        Optional labels the model gave before the user painted ``labels`` (one per image, or
        ``None`` entries). The pixels the user corrected are sampled far more often and weigh
        more in the loss (:mod:`~napari_unet_studio.corrections`).
    seed
        Makes the run reproducible on the CPU, with the same number of torch threads
        (``fit_threads=False``: fitted threads follow the machine's load, and float sums over
        another thread count round differently).
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
        Peak learning rate; default 1e-3 from scratch; when fine-tuning, 3e-4, or 3e-5 when the
        first image is familiar to the model (its uncertainty within what the model's card
        records; the run's record says ``familiar``).
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
        convolution is widened to three channels (:func:`widen_input`,
        starting from the luminance weights) so it can learn colour; the returned model then
        takes RGB. On stained tissue this measured better than the luminance with an earlier version of
        the package, and worse in the two latest runs (one seed each; see the README).
        With ``False`` (or mixed gray and colour images) RGB images are used as their luminance.
    freeze_encoder
        Keep the contracting path fixed (fine-tuning on very few labels).
    ignore_value
        Label value meaning "not annotated" (weight 0).
    val_images, val_labels
        Optional validation pairs; AP@0.5 is measured every ``val_every`` steps and the best
        model by it is returned. A validation stack is scored on its slices holding objects,
        each normalised as :func:`~napari_unet_studio.segment` normalises it.
    val_axes
        What each validation stack's first axis is (as ``axes``).
    holdout
        Without validation pairs, hold out a few painted objects and keep the weights that
        segment them, and the corrected objects, best; on images the model finds unfamiliar,
        the model's own labels given as ``previous`` are not held out (see
        :class:`TrainingSession`).
    replay
        Optional ``(image, labels)`` pairs of what the model already knows, mixed into a fifth
        of the crops against forgetting (see :class:`TrainingSession`).
    distill, tune_postprocess
        Train unedited pixels towards the starting probabilities; re-choose the
        post-processing with the weights (both off by default; see :class:`TrainingSession`).
    keep_norm_statistics
        Keep BatchNorm's running statistics fixed while training (see :class:`TrainingSession`).
    scale
        Train on the images (and labels) resized by this factor, the scale they were segmented
        at (see :func:`~napari_unet_studio.rescale.choose_scale`); the run's record keeps it, and
        the scale chooser tries it first for this model.
    w0, sigma
        Weight-map parameters.
    deep_supervision
        U-Net++: average the loss over all heads.
    dice_weight
        Adds this times a soft Dice loss.
    augment
        Elastic, rotation/flip and gray-value augmentation (``True``, the default), none
        (``False``), or the default plus ``{"scale": s, "invert": p}``: zoom by up to ``1 + s``
        and reversed polarity with probability ``p`` (for models meant for several kinds of
        images, see ``training/transfer.py``).
    device
        As for :func:`~napari_unet_studio.predict`; CUDA uses mixed precision.

    Returns
    -------
    model, history
        The trained model with the best weights seen (``model`` itself, trained in place, or
        its widened copy, see ``widen_for_rgb``), in eval mode; and one record per step.
        The run's record in ``model.card.provenance["training"]`` says why it stopped
        (``"steps"``, ``"time"``, ``"cancelled"``, ``"diverged"``).
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} label images")
    if not len(images):
        raise InputError("no training images")
    axes = axes_per_image(axes, len(images))
    for name, seq in (("regions", regions), ("previous", previous)):
        if seq is not None and len(seq) != len(images):
            raise InputError(f"{len(images)} images but {len(seq)} {name}")
    if steps is None and time_budget is None:
        steps = 500
    widened = widen_for_rgb and will_widen(model, images, channel_axis)
    original = model
    if widened:
        model = widen_input(model)
    session = TrainingSession(model, channel_axis=channel_axis, **options)
    regions = regions if regions is not None else [None] * len(images)
    previous = previous if previous is not None else [None] * len(images)
    names = names if names is not None else [f"image {i + 1}" for i in range(len(images))]
    for i, (im, lab, reg, prev, name, ax) in enumerate(zip(images, labels, regions, previous, names, axes)):
        session.set_pair(i, im, lab, region=reg, previous=prev, name=name, axes=ax)
    session.prepare()
    session.run(steps=steps, time_budget=time_budget, progress=progress, cancel=cancel, val_every=val_every)
    model = session.finish(**({"input_widened": "1 -> 3 channels"} if widened else {}))
    if widened and session.best["step"] == 0 and session.best["state"] is not None:
        # The starting weights won: hand back the model as it was (segmenting colour images by
        # their luminance), not its widened copy, which normalises each channel apart.
        run = dict(card_of(model).provenance["training"][-1])
        run.pop("input_widened")
        run.pop("postprocess", None)  # chosen for the widened copy; the original keeps its own
        model = copy.deepcopy(original).eval()  # the caller's model stays untouched
        card_of(model).provenance["training"] = list(card_of(model).provenance.get("training", [])) + [run]
    return model, session.history
