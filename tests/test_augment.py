"""Elastic deformation: the paper's recipe (coarse grid, sigma, bicubic field), shared by image/labels/weights."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_unet_studio import elastic_deform
from napari_unet_studio.augment import displacement_field, sampling_grid, warp


def test_displacements_have_the_requested_sigma_and_grid():
    g = torch.Generator().manual_seed(0)
    field = displacement_field(4000, (41, 41), grid=3, sigma=10.0, generator=g)
    lattice = field[:, :, ::20, ::20]  # the 3x3 lattice points (corners, edge midpoints, centre)
    assert lattice.std().item() == pytest.approx(10.0, rel=0.03)
    assert abs(lattice.mean().item()) < 0.2
    # Independent lattice vectors, smooth in between.
    a, b = field[:, 0, 0, 0].numpy(), field[:, 0, 20, 20].numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    c = field[:, 0, 0, 1].numpy()
    assert np.corrcoef(a, c)[0, 1] > 0.99
    # Between lattice points, bicubic interpolation: not exceeding the lattice spread by much.
    assert field.std().item() < 10.5


def test_grid_parameter_changes_the_lattice():
    g = torch.Generator().manual_seed(1)
    field = displacement_field(3000, (41, 41), grid=5, sigma=4.0, generator=g)
    lattice = field[:, :, ::10, ::10]
    assert lattice.std().item() == pytest.approx(4.0, rel=0.04)
    assert abs(np.corrcoef(field[:, 1, 0, 0].numpy(), field[:, 1, 0, 10].numpy())[0, 1]) < 0.06


def test_sampling_matches_scipy_map_coordinates(rng):
    h, w = 60, 70
    image = ndi.gaussian_filter(rng.random((h, w)), 2).astype(np.float32)
    field = displacement_field(1, (h, w), sigma=3.0, generator=torch.Generator().manual_seed(3))
    out = warp(torch.from_numpy(image)[None, None], sampling_grid(field), "bilinear")[0, 0].numpy()
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    coords = [yy + field[0, 0].numpy(), xx + field[0, 1].numpy()]
    expected = ndi.map_coordinates(image, coords, order=1, mode="mirror")
    inside = (coords[0] >= 0) & (coords[0] <= h - 1) & (coords[1] >= 0) & (coords[1] <= w - 1)
    assert np.abs(out - expected)[inside].max() < 1e-4


def test_same_deformation_for_image_labels_and_weights():
    yy, xx = np.mgrid[:80, :90].astype(np.float32)
    ids = (yy * 1000 + xx).astype(np.int32)  # each label id encodes its pixel's position
    d = elastic_deform(yy, ids, xx, seed=4)
    e = elastic_deform(xx, None, yy, seed=4)
    inner = (slice(20, 60), slice(20, 70))
    # The image (bicubic) and the weights (bilinear) moved the same way: same source coordinates.
    assert np.abs(d.image - e.weights)[inner].max() < 0.3
    assert np.abs(e.image - d.weights)[inner].max() < 0.3
    # Labels (nearest) come from within one pixel of the same source position.
    assert np.abs(d.labels // 1000 - e.weights)[inner].max() <= 1.0
    assert np.abs(d.labels % 1000 - d.weights)[inner].max() <= 1.0
    assert np.abs(d.weights - xx)[inner].max() > 2  # and it did deform
    assert d.displacement.shape == (2, 80, 90)


def test_labels_stay_ids_and_seed_reproduces(rng):
    labels = np.zeros((64, 64), np.int32)
    labels[10:30, 10:30] = 3
    labels[35:60, 30:60] = 8
    image = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
    a = elastic_deform(image, labels, seed=7)
    b = elastic_deform(image, labels, seed=7)
    assert set(np.unique(a.labels)) <= {0, 3, 8}
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.image.dtype == np.uint8 and a.image.shape == image.shape
    assert not np.array_equal(elastic_deform(image, labels, seed=8).labels, a.labels)


def test_zero_sigma_is_identity(rng):
    image = rng.random((30, 40)).astype(np.float32)
    d = elastic_deform(image, sigma=0.0, seed=0)
    np.testing.assert_allclose(d.image, image, atol=1e-5)


def test_shape_mismatch_is_an_error(rng):
    with pytest.raises(ValueError, match="does not match"):
        elastic_deform(np.zeros((10, 10)), labels=np.zeros((10, 11), int))


def test_zoom_draws_factors_log_uniformly_within_the_range():
    from napari_unet_studio.augment import affine_matrices

    g = torch.Generator().manual_seed(0)
    m = affine_matrices(4000, rotate=True, flip=True, scale=0.5, generator=g)
    # Rotation and flip keep |det| = 1, so the zoom factor is sqrt(|det|).
    factor = torch.sqrt(torch.linalg.det(m[:, :, :2]).abs())
    assert factor.min() >= 1 / 1.5 - 1e-6 and factor.max() <= 1.5 + 1e-6
    logs = torch.log(factor)
    assert abs(float(logs.mean())) < 0.02  # as many zoomed in as out
    assert float((factor > 1.4).float().mean()) > 0.05
    plain = affine_matrices(100, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.linalg.det(plain[:, :, :2]).abs(), torch.ones(100), atol=1e-5)


def test_polarity_is_reversed_with_the_given_probability():
    from napari_unet_studio.augment import gray_value_augment

    x = torch.zeros(2000, 1, 4, 4)
    x[:, :, 1:3, 1:3] = 1.0  # a bright object on a dark background
    out = gray_value_augment(x, generator=torch.Generator().manual_seed(1), invert=0.3, strength=0.0)
    dark_object = out[:, 0, 1, 1] < out[:, 0, 0, 0]
    assert 0.26 < float(dark_object.float().mean()) < 0.34
    same = gray_value_augment(x, generator=torch.Generator().manual_seed(1), strength=0.0)
    assert torch.equal(same, x)
