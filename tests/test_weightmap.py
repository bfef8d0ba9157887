"""The weight map against the formula computed naively (one distance transform per object)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet_studio.weightmap import class_balance, weight_map


def naive_weight_map(labels, w0=10.0, sigma=5.0):
    """w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background, d from full-image EDTs."""
    ids = [i for i in np.unique(labels) if i != 0]
    w = class_balance(labels).astype(np.float64)
    if len(ids) < 2:
        return w
    d = np.stack([ndi.distance_transform_edt(labels != i) for i in ids])
    d.sort(axis=0)
    term = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return w + np.where(labels == 0, term, 0.0)


def random_cells(shape, n, rng, radius=(4, 12)):
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(*radius)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = i
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_naive_reference(seed):
    rng = np.random.default_rng(seed)
    labels = random_cells((160, 190), 40, rng)
    fast = weight_map(labels)
    naive = naive_weight_map(labels)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    assert np.abs(fast - naive).max() <= 1e-4


def test_other_parameters_and_sparse_ids():
    rng = np.random.default_rng(5)
    labels = random_cells((120, 120), 25, rng) * 7  # ids need not be consecutive
    assert np.abs(weight_map(labels, w0=5.0, sigma=3.0) - naive_weight_map(labels, 5.0, 3.0)).max() <= 1e-4


def test_gap_between_touching_cells_gets_the_highest_weight():
    labels = np.zeros((40, 60), np.int32)
    labels[10:30, 5:28] = 1
    labels[10:30, 30:55] = 2  # two-pixel gap at columns 28-29
    w = weight_map(labels)
    gap = w[20, 28]
    assert gap == pytest.approx(class_balance(labels)[20, 28] + 10 * np.exp(-(1 + 2) ** 2 / 50), rel=1e-5)
    assert gap > w[20, 0] and gap > w[0, 28]


def test_class_balance_equalises_totals():
    labels = np.zeros((10, 10), np.int32)
    labels[:2] = 1
    wc = class_balance(labels)
    assert wc[labels > 0].sum() == pytest.approx(wc[labels == 0].sum())
    assert wc.mean() == pytest.approx(1.0)


def test_ignore_value_gets_zero_weight():
    labels = np.zeros((30, 30), np.int32)
    labels[5:10, 5:10] = 1
    labels[20:, 20:] = 99
    w = weight_map(labels, ignore_value=99)
    assert (w[20:, 20:] == 0).all() and (w[:20] > 0).all()


def test_single_object_and_empty_labels():
    labels = np.zeros((20, 20), np.int32)
    assert (weight_map(labels) == 1).all()
    labels[5:9, 5:9] = 3
    np.testing.assert_allclose(weight_map(labels), class_balance(labels))
