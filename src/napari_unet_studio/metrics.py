"""Segmentation metrics: instance average precision, matched IoU, pixel error, adapted Rand error.

Average precision follows the Data Science Bowl 2018 / StarDist / Cellpose convention: at an
IoU threshold t, predicted and true objects are matched one-to-one (maximising total IoU among
pairs with IoU >= t), and ``AP = TP / (TP + FP + FN)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import relabel_sequential

#: IoU thresholds 0.5, 0.55, ..., 0.95.
COCO_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))


def as_instances(labels: np.ndarray) -> np.ndarray:
    """Instance labels of ``labels``: a label image with a single non-zero value (or a boolean
    array) is a binary mask, and its connected components are the objects (so ISBI 2012 cell
    masks, whose membranes are the background, become cells)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return ndi.label(labels)[0]
    values = np.unique(labels)
    values = values[values != 0]
    if len(values) == 1:
        return ndi.label(labels != 0)[0]
    return labels.astype(np.int64, copy=False)


def compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``labels`` with ids 1..n when its ids are sparse beyond its pixel count (64-bit ids from
    other tools), and the map back (``original = inverse[compact]``); otherwise ``labels`` as it
    is and None. Anything that allocates per id value (``ndi.find_objects``, regionprops) needs it."""
    if labels.max(initial=0) <= labels.size:
        return labels, None
    compact, _, inverse = relabel_sequential(labels)
    return compact, inverse


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU of every (true object, predicted object) pair, shape ``(n_true, n_pred)``."""
    pred = relabel_sequential(np.asarray(pred, dtype=np.int64))[0]
    true = relabel_sequential(np.asarray(true, dtype=np.int64))[0]
    n_pred, n_true = int(pred.max()), int(true.max())
    overlap = np.bincount(true.ravel() * (n_pred + 1) + pred.ravel(), minlength=(n_true + 1) * (n_pred + 1))
    overlap = overlap.reshape(n_true + 1, n_pred + 1)
    area_true = overlap.sum(1, keepdims=True)
    area_pred = overlap.sum(0, keepdims=True)
    union = area_true + area_pred - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[1:, 1:]


def match(iou: np.ndarray, threshold: float) -> int:
    """Number of one-to-one matches with IoU >= ``threshold`` (maximum-IoU assignment)."""
    if iou.size == 0:
        return 0
    cost = np.where(iou >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(-cost)
    return int((iou[rows, cols] >= threshold).sum())


def average_precision(pred: np.ndarray, true: np.ndarray, thresholds=(0.5,)) -> dict[float, float]:
    """``TP / (TP + FP + FN)`` at each IoU threshold, for one image."""
    iou = iou_matrix(pred, true)
    n_true, n_pred = iou.shape
    out = {}
    for t in thresholds:
        tp = match(iou, t)
        denom = n_true + n_pred - tp
        out[float(t)] = 1.0 if denom == 0 else tp / denom
    return out


def mean_matched_iou(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> float:
    """Mean IoU of the objects matched at ``threshold`` (NaN when nothing matches)."""
    iou = iou_matrix(pred, true)
    if iou.size == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(-np.where(iou >= threshold, iou, 0.0))
    matched = iou[rows, cols]
    matched = matched[matched >= threshold]
    return float(matched.mean()) if matched.size else float("nan")


def pixel_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of pixels whose foreground/background assignment differs (ISBI 2012)."""
    return float(np.mean((np.asarray(pred) > 0) != (np.asarray(true) > 0)))


def rand_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Adapted Rand error of the ISBI 2012 challenge (skimage), background of ``true`` ignored."""
    from skimage.metrics import adapted_rand_error

    return float(adapted_rand_error(np.asarray(true), np.asarray(pred))[0])


def check_labels(labels, what: str = "labels") -> np.ndarray:
    """``labels`` as an array if it is a 2-D (or 3-D stack of) non-negative integer label
    image; otherwise :class:`~napari_unet_studio.errors.InputError` naming what is wrong."""
    from .errors import InputError

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise InputError(f"{what} must be a 2-D label image (or a 3-D stack), got shape {labels.shape}")
    if labels.ndim == 3 and labels.shape[-1] in (3, 4):
        raise InputError(f"{what} of shape {labels.shape} look like an RGB(A) image, not labels")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"{what} must hold integers, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError(f"{what} hold negative values (min {labels.min()}); labels are 0 (background) or positive ids")
    return labels


def _mean(values) -> float | None:
    """Mean of the defined values; ``None`` when none is defined (e.g. IoU with no objects)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def evaluate(preds, trues) -> dict:
    """All metrics over a set of images, averaged per image. Binary masks count as their
    connected components (:func:`as_instances`). Both empty counts as AP 1; a metric that is
    undefined on every image (mean matched IoU when nothing matches) is ``None``.
    Raises :class:`~napari_unet_studio.errors.InputError` for label images that are not
    non-negative integers of matching shapes."""
    from .errors import InputError

    preds, trues = list(preds), list(trues)
    if len(preds) != len(trues):
        raise InputError("as many predictions as ground truths are needed")
    if not preds:
        raise InputError("nothing to evaluate")
    ap50, ap_coco, miou, pe, re = [], [], [], [], []
    for i, (p, t) in enumerate(zip(preds, trues)):
        p, t = check_labels(p, "predicted labels"), check_labels(t, "true labels")
        if p.shape != t.shape:
            raise InputError(f"predicted labels {p.shape} and true labels {t.shape} differ in shape (pair {i + 1})")
        p, t = as_instances(p), as_instances(t)
        ap = average_precision(p, t, COCO_THRESHOLDS)
        ap50.append(ap[0.5])
        ap_coco.append(float(np.mean(list(ap.values()))))
        miou.append(mean_matched_iou(p, t))
        pe.append(pixel_error(p, t))
        re.append(rand_error(p, t) if t.any() else (0.0 if not p.any() else math.nan))  # undefined: no counted pixels
    return {
        "images": len(preds),
        "ap50": _mean(ap50),
        "ap50_95": _mean(ap_coco),
        "mean_matched_iou": _mean(miou),
        "pixel_error": _mean(pe),
        "rand_error": _mean(re),
    }
