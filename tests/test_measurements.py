"""Per-object measurements: equal to regionprops_table, 3-D objects, frames, colour, CSV."""

import csv

import numpy as np
import pytest
from skimage.measure import regionprops_table

from napari_unet_studio import InputError
from napari_unet_studio.measurements import measure, write_csv


def two_objects():
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:25] = 3
    yy, xx = np.mgrid[:40, :50]
    labels[(yy - 28) ** 2 + (xx - 35) ** 2 < 64] = 7
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    return labels, image


def test_2d_measurements_equal_regionprops_table():
    labels, image = two_objects()
    table = measure(labels, image)
    ref = regionprops_table(labels, intensity_image=image, properties=(
        "label", "area", "centroid", "bbox", "eccentricity", "solidity", "intensity_mean", "intensity_min", "intensity_max"))
    assert table["label"].tolist() == [3, 7]
    np.testing.assert_array_equal(table["area"], ref["area"])
    np.testing.assert_allclose(table["centroid_y"], ref["centroid-0"])
    np.testing.assert_allclose(table["centroid_x"], ref["centroid-1"])
    np.testing.assert_array_equal(table["bbox_min_y"], ref["bbox-0"])
    np.testing.assert_array_equal(table["bbox_max_x"], ref["bbox-3"])
    for key in ("eccentricity", "solidity", "intensity_mean", "intensity_min", "intensity_max"):
        np.testing.assert_allclose(table[key], ref[key])
    assert table["area"][0] == 200 and table["intensity_max"][0] == image[labels == 3].max()


def test_3d_objects_are_measured_as_volumes_and_frames_apart():
    labels, image = two_objects()
    stack = np.stack([labels, labels, np.where(labels == 7, 7, 0)])
    volume = measure(stack, np.stack([image] * 3))
    assert volume["area"].tolist() == [400, 3 * int((labels == 7).sum())]
    assert "centroid_z" in volume and "eccentricity" not in volume
    frames = measure(stack, axes="TYX")
    assert frames["frame"].tolist() == [0, 0, 1, 1, 2]
    assert frames["area"].tolist()[:2] == [200, int((labels == 7).sum())]


def test_colour_images_give_one_column_per_channel():
    labels, image = two_objects()
    rgb = np.stack([image, 2 * image, 3 * image], -1)
    table = measure(labels, rgb, channel_axis=-1)
    np.testing.assert_allclose(table["intensity_mean_channel2"], 3 * table["intensity_mean_channel0"], rtol=1e-5)
    with pytest.raises(InputError, match="does not match"):
        measure(labels, image[:10])
    with pytest.raises(InputError):
        measure(labels.astype(np.float32))


def test_csv_has_a_header_and_one_row_per_object(tmp_path):
    labels, image = two_objects()
    table = measure(labels, image)
    path = write_csv(tmp_path / "m.csv", table)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and rows[1]["label"] == "7" and float(rows[0]["area"]) == 200
    assert list(rows[0]) == list(table)


def test_block_wise_measurements_equal_the_whole_ones():
    zarr = pytest.importorskip("zarr")
    from napari_unet_studio.measurements import measure_blocks

    labels, image = two_objects()
    big = np.zeros((90, 110), np.int32)
    big[20:60, 30:80] = labels  # objects cross the 32 px blocks
    img = np.zeros(big.shape, np.float32)
    img[20:60, 30:80] = image
    stored = zarr.create_array(store={}, shape=big.shape, chunks=(32, 32), dtype="int32")
    stored[:] = big
    whole = measure(big, img)
    blocks = measure_blocks(stored, img, block_size=32)
    assert set(blocks) <= set(whole)
    for key in blocks:
        np.testing.assert_allclose(blocks[key], whole[key], rtol=1e-6, err_msg=key)  # skimage sums in float32
    stack = np.stack([big, np.where(big == 7, 7, 0)])
    np.testing.assert_allclose(measure_blocks(stack, block_size=32)["centroid_z"], measure(stack)["centroid_z"])
