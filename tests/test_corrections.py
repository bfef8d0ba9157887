"""Corrections: what the user's painting changed in the labels a model gave."""

import numpy as np
import pytest

from napari_unet_studio import InputError
from napari_unet_studio.corrections import find_corrections


def two_discs(gap=True):
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)
    labels[(yy - 32) ** 2 + (xx - 20) ** 2 <= 64] = 1
    labels[(yy - 32) ** 2 + (xx - 44) ** 2 <= 64] = 2
    return labels


def test_nothing_painted_is_no_correction():
    labels = two_discs()
    found = find_corrections(labels, labels.copy())
    assert found.count == 0 and not found.mask.any() and found.summary().startswith("no corrections")


def test_a_merge_is_found_with_the_gap():
    previous = two_discs()
    painted = previous.copy()
    painted[28:37, 20:45] = 1  # the user paints label 1 over the gap and over object 2
    painted[painted == 2] = 1
    found = find_corrections(previous, painted)
    assert (found.merged, found.split, found.added, found.erased) == (1, 0, 0, 0)
    assert found.mask[32, 32] and found.mask[32, 44]  # the gap and the merged object
    assert not found.mask[2, 2]  # far background untouched
    assert found.changed.sum() == (previous != painted).sum()


def test_a_split_is_found():
    yy, xx = np.mgrid[:64, :64]
    previous = np.zeros((64, 64), np.int32)
    previous[((yy - 32) ** 2 + (xx - 32) ** 2 <= 200)] = 5
    painted = previous.copy()
    painted[:, 32:] = np.where(painted[:, 32:] == 5, 6, 0)
    painted[:, 31:33] = 0  # the user draws a background line between the halves
    found = find_corrections(previous, painted)
    assert found.split == 1 and found.merged == 0
    assert found.mask[32, 31] and found.mask[32, 40]
    # The cut, and the outlines of the objects involved, not their insides.
    assert found.mask[32, 18] and not found.mask[32, 24]


def test_erasure_and_addition():
    previous = two_discs()
    painted = previous.copy()
    painted[painted == 2] = 0  # erase a false object
    painted[5:12, 5:12] = 9  # add a missed one
    found = find_corrections(previous, painted)
    assert (found.erased, found.added, found.merged, found.split) == (1, 1, 0, 0)
    assert found.mask[8, 8] and found.mask[32, 44]
    assert not found.mask[32, 20]  # object 1 kept as it was
    assert "1 erasure" in found.summary() and "1 addition" in found.summary()


def test_ignored_pixels_are_never_corrections():
    previous = two_discs()
    painted = previous.copy()
    painted[5:12, 5:12] = 9
    ignore = np.zeros_like(previous, bool)
    ignore[:20, :20] = True
    found = find_corrections(previous, painted, ignore=ignore)
    assert not found.mask[ignore].any()


@pytest.mark.parametrize(
    "previous, painted, message",
    [
        (np.zeros((4, 4), int), np.zeros((4, 5), int), "do not match"),
        (np.zeros((4, 4, 2), int), np.zeros((4, 4, 2), int), "2-D"),
        (np.zeros((4, 4), float), np.zeros((4, 4), int), "integers"),
    ],
)
def test_bad_inputs_are_one_line_errors(previous, painted, message):
    with pytest.raises(InputError, match=message):
        find_corrections(previous, painted)


def test_corrections_are_found_around_the_strokes_whatever_the_image_around_them():
    """Only the box around the touched objects is examined: the same strokes in a larger image,
    anywhere, give the same corrections there and nothing elsewhere."""
    from skimage.measure import label

    rng = np.random.default_rng(0)
    for trial in range(20):
        previous = label(rng.random((60, 70)) > 0.6)
        painted = previous.copy()
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 55), rng.integers(0, 65)
            painted[y : y + rng.integers(1, 10), x : x + rng.integers(1, 10)] = rng.integers(0, previous.max() + 3)
        small = find_corrections(previous, painted)
        top, left = rng.integers(3, 40, size=2)
        big_prev = np.zeros((160, 170), np.int32)
        big_paint = np.zeros((160, 170), np.int32)
        big_prev[top : top + 60, left : left + 70] = previous
        big_paint[top : top + 60, left : left + 70] = painted
        big = find_corrections(big_prev, big_paint)
        inside = (slice(top, top + 60), slice(left, left + 70))
        assert (big.merged, big.split, big.added, big.erased) == (small.merged, small.split, small.added, small.erased)
        expected = np.zeros(big_prev.shape, bool)
        # the small image's edge cuts the band of dilation: compare where both see the same pixels
        expected[inside] = small.mask
        core = np.zeros(big_prev.shape, bool)
        core[top + 3 : top + 57, left + 3 : left + 67] = True
        assert np.array_equal(big.mask & core, expected & core), trial
        outside = np.ones(big_prev.shape, bool)
        outside[top - 3 : top + 63, left - 3 : left + 73] = False
        assert not (big.mask & outside).any()  # nothing far from the strokes
