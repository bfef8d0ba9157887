"""Linking per-slice objects into 3-D objects: global one-to-one matching and gap closing."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from test_blocks import same_up_to_renumbering

from napari_unet_studio import InputError
from napari_unet_studio.linking import link_slices, match, waist_cuts


def ellipsoids(shape=(12, 80, 80), seed=0, n=8, z_step=3.0):
    """Ground-truth 3-D labels of ``n`` non-touching ellipsoids, sampled every ``z_step`` pixels in z."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    zz *= z_step
    labels = np.zeros(shape, np.int32)
    centres = []
    while len(centres) < n:
        c = rng.uniform([6, 10, 10], [shape[0] * z_step - 6, shape[1] - 10, shape[2] - 10])
        r = rng.uniform(6, 9, 3)
        if all(np.linalg.norm((c - d)[1:]) > 20 or abs(c[0] - d[0]) > 22 for d in centres):
            centres.append(c)
            labels[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1] = len(centres)
    return labels


def per_slice(labels3d, seed=1):
    """Each slice's objects with fresh, shuffled ids (as a 2-D segmentation would give them)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(labels3d)
    for z, plane in enumerate(labels3d):
        ids = np.unique(plane[plane > 0])
        new = rng.permutation(len(ids)) + 1
        lut = np.zeros(labels3d.max() + 1, np.int32)
        lut[ids] = new
        out[z] = lut[plane]
    return out


def test_linking_recovers_3d_objects():
    truth = ellipsoids()
    linked = link_slices(per_slice(truth))
    assert same_up_to_renumbering(linked, truth)
    assert linked.max() == truth.max()


def test_a_missed_slice_is_bridged():
    truth = ellipsoids(seed=3)
    slices = per_slice(truth)
    z = 5
    victim = np.unique(slices[z][slices[z] > 0])[0]
    slices[z][slices[z] == victim] = 0  # the 2-D segmentation missed one object in slice 5
    expected = np.where(slices > 0, truth, 0)
    linked = link_slices(slices)
    assert same_up_to_renumbering(linked, expected)


def test_matching_is_one_to_one_and_global():
    # shared pixels a1-b1 60, a1-b2 50, a2-b1 50: the best pair per object (greedy) gives b1 to
    # both a1 and a2; the global matching pairs a1-b2 and a2-b1 (total 100 > 60).
    pairs = match(np.array([1, 1, 2]), np.array([10, 11, 10]), np.array([60, 50, 50]))
    assert sorted(pairs) == [(1, 11), (2, 10)]
    assert match(np.array([1, 1]), np.array([10, 11]), np.array([60, 50]), np.array([False, True])) == [(1, 11)]


def test_an_object_that_splits_keeps_its_id_on_one_part_only():
    stack = np.zeros((2, 30, 40), np.int32)
    stack[0, 5:25, 5:35] = 1  # one wide object ...
    stack[1, 5:25, 5:19] = 1  # ... is two in the next slice
    stack[1, 5:25, 21:35] = 2
    linked = link_slices(stack)
    assert linked.max() == 2  # not one merged id (greedy stitching), not three
    assert len(np.unique(linked[1][linked[1] > 0])) == 2


def test_bad_stacks_are_refused():
    with pytest.raises(InputError):
        link_slices(np.zeros((5, 5), np.int32))
    with pytest.raises(InputError):
        link_slices(np.zeros((2, 5, 5), np.float32))
    with pytest.raises(InputError, match="min_overlap"):
        link_slices(np.zeros((2, 5, 5), np.int32), min_overlap=0)


def test_a_tapering_object_is_not_linked_over_a_gap():
    """Two nuclei stacked in z with one empty slice between: the first narrows to its end, so
    it ends there; the same gap after an abrupt end is a missed slice and is bridged."""
    stack = np.zeros((6, 40, 40), np.int32)
    for z, r in enumerate((8, 8, 4)):  # tapers: 8, 8, then 4 px half-width
        stack[z, 20 - r : 20 + r, 20 - r : 20 + r] = 1
    stack[4:, 14:26, 14:26] = 1  # the next nucleus, after the empty slice 3
    assert link_slices(stack).max() == 2
    stack[2, 12:28, 12:28] = 1  # no longer tapering: slice 3 looks missed
    assert link_slices(stack).max() == 1


def touching_in_z(z_step=3.0):
    """Two ellipsoids on top of each other, touching along z (half a pixel into each other), and their per-slice objects as a
    2-D segmentation gives them: where the caps share a slice they are one object."""
    zz, yy, xx = np.mgrid[: int(52 / z_step), :60, :60].astype(np.float32)
    zz *= z_step
    truth = np.zeros(zz.shape, np.int32)
    for i, (cz, rz, r) in enumerate(((12.0, 10.0, 16.0), (12.0 + 10.0 + 11.5, 12.0, 14.0)), 1):
        truth[((zz - cz) / rz) ** 2 + ((yy - 30) / r) ** 2 + ((xx - 31) / r) ** 2 < 1] = i
    slices = np.stack([ndi.label(plane > 0)[0] for plane in truth])
    return truth, slices


@pytest.mark.parametrize("z_step", [2.0, 3.0, 4.0])
def test_two_nuclei_touching_in_z_are_cut_at_their_waist(z_step):
    truth, slices = touching_in_z(z_step)
    occupied = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    assert np.array_equal(occupied, np.arange(occupied[0], occupied[-1] + 1))  # no empty slice between them
    assert link_slices(slices, waists=False).max() == 1  # matched slice to slice, they are one
    linked = link_slices(slices)
    assert linked.max() == 2
    for i in (1, 2):  # each nucleus is one object; a cap section may go to either (sizes cannot tell)
        best = np.bincount(linked[truth == i]).argmax()
        both = ((truth == i) & (linked == best)).sum()
        assert both / ((truth == i) | (linked == best)).sum() > 0.9


def test_waist_cuts_only_deep_waists_and_goes_between_the_smaller_sections():
    assert waist_cuts([10, 50, 100, 50, 10]) == []  # one nucleus: sections grow, then shrink
    assert waist_cuts([20, 80, 100, 60, 100, 70, 20]) == []  # a slice under-segmented, not a waist
    assert waist_cuts([10, 80, 100, 30, 10, 40, 90, 20]) == [3]  # between 30 and 10: 10's smaller neighbour
    assert waist_cuts([10, 80, 100, 40, 10, 30, 90, 20]) == [4]  # between 10 and 30
    assert waist_cuts([10, 100, 10, 100, 10, 100, 10]) == [2, 4]  # three nuclei
    assert waist_cuts([100, 10]) == []


def test_frames_of_a_time_series_are_not_cut_at_a_waist():
    """A cell that shrinks and grows again over time is one track; in a volume, the same
    sections are two objects touching along z."""
    from test_blocks import pass_through

    from napari_unet_studio import segment

    stack = np.zeros((5, 40, 40), np.float32)
    for t, half in enumerate((9, 9, 2, 9, 9)):
        stack[t, 20 - half : 20 + half, 20 - half : 20 + half] = 1
    model = pass_through()
    assert segment(model, stack, min_size=1, axes="TYX", track=True).max() == 1
    assert segment(model, stack, min_size=1, axes="ZYX").max() == 2
