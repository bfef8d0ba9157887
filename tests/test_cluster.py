"""Blocks as tasks on a dask.distributed cluster (a LocalCluster on loopback): the workers load the
model from its file and write into the zarr output, and the labels equal single-process
segmentation id for id."""

import numpy as np
import pytest
import tifffile
import zarr

from napari_unet_studio import Cancelled, load_model, segment
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.cli import main
from napari_unet_studio.errors import InputError

distributed = pytest.importorskip("distributed")
from napari_unet_studio.cluster import segment_on_cluster  # noqa: E402

BLOCK, OVERLAP = 96, 48


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _out(tmp_path, shape, name="out.zarr", chunks=None):
    chunks = chunks or tuple(1 for _ in shape[:-2]) + (BLOCK // 2, BLOCK // 2)
    return zarr.open_array(str(tmp_path / name), mode="w", shape=shape, chunks=chunks, dtype="int32")


@pytest.fixture(scope="module")
def nuclei():
    return load_sample("nuclei")[0][:300, :330]


def test_a_plane_on_the_cluster_equals_one_process_id_for_id(client, tmp_path, nuclei):
    expected = segment(load_model(), nuclei, block_size=BLOCK, overlap=OVERLAP)
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(path, nuclei)
    for source in (path, nuclei):  # a file the workers open, or an array sent to them
        out = _out(tmp_path, nuclei.shape)
        seen = []
        n = segment_on_cluster("default", source, out, scheduler=client, block_size=BLOCK, overlap=OVERLAP,
                               progress=lambda done, total: seen.append((done, total)))
        assert np.array_equal(out[:], expected) and n == expected.max() > 20
        assert seen[0] == (0, 16) and seen[-1] == (16, 16)  # 4 x 4 blocks, counted as they finish


def test_a_volume_and_a_time_series_on_the_cluster_equal_one_process(client, tmp_path, nuclei):
    stack = np.stack([nuclei[:200, :200], nuclei[2:202, 1:201], nuclei[4:204, 3:203]])
    model = load_model()
    for axes, track in (("ZYX", False), ("TYX", False), ("TYX", True)):
        expected = segment(model, stack, block_size=BLOCK, overlap=OVERLAP, axes=axes, track=track)
        out = _out(tmp_path, stack.shape, name=f"{axes}{track}.zarr")
        segment_on_cluster("default", stack, out, scheduler=client, block_size=BLOCK, overlap=OVERLAP, axes=axes, track=track)
        assert np.array_equal(out[:], expected), (axes, track)
    linked = np.unique(expected[0][expected[0] > 0])
    assert np.isin(linked, expected[1]).mean() > 0.8  # tracked: most objects keep their id


def test_a_saved_model_and_post_processing_settings_reach_the_workers(client, tmp_path, nuclei):
    from napari_unet_studio import save_model
    from napari_unet_studio.card import card_of

    model = load_model()
    card_of(model).postprocess = {"threshold": 0.6, "min_size": 40}
    path = save_model(model, tmp_path / "mine.safetensors")
    expected = segment(model, nuclei, block_size=BLOCK, overlap=OVERLAP, seed_threshold=None)
    out = _out(tmp_path, nuclei.shape)
    segment_on_cluster(path, nuclei, out, scheduler=client, block_size=BLOCK, overlap=OVERLAP, seed_threshold=None)
    assert np.array_equal(out[:], expected)


def test_wrong_requests_are_refused_before_any_task(client, tmp_path, nuclei):
    with pytest.raises(InputError, match="zarr array"):
        segment_on_cluster("default", nuclei, np.zeros(nuclei.shape, np.int32), scheduler=client, block_size=BLOCK)
    with pytest.raises(InputError, match="chunks .* must tile the blocks"):
        segment_on_cluster("default", nuclei, _out(tmp_path, nuclei.shape, chunks=(64, 64)), scheduler=client, block_size=BLOCK)
    with pytest.raises(InputError, match="not a model object"):
        segment_on_cluster(load_model(), nuclei, _out(tmp_path, nuclei.shape), scheduler=client, block_size=BLOCK)
    with pytest.raises(InputError, match="scheduler address, or a number of local workers"):
        segment_on_cluster("default", nuclei, _out(tmp_path, nuclei.shape), block_size=BLOCK)
    with pytest.raises(InputError, match="cannot reach the dask scheduler"):
        segment_on_cluster("default", nuclei, _out(tmp_path, nuclei.shape), scheduler="tcp://127.0.0.1:9", block_size=BLOCK)


def test_a_worker_that_cannot_read_the_model_says_so(client, tmp_path, nuclei, monkeypatch):
    from napari_unet_studio import save_model

    path = save_model(load_model(), tmp_path / "gone.safetensors")
    out = _out(tmp_path, nuclei.shape)
    # The file is gone once this process has read it: the workers, which read it themselves, fail.
    monkeypatch.setattr("napari_unet_studio.checkpoint.load_model", lambda *a, **k: (path.unlink(), load_model())[1])
    with pytest.raises(InputError, match="a worker cannot read the model file"):
        segment_on_cluster(path, nuclei, out, scheduler=client, block_size=BLOCK, overlap=OVERLAP)


def test_cancel_stops_the_tasks(client, tmp_path, nuclei):
    out = _out(tmp_path, nuclei.shape)
    with pytest.raises(Cancelled):
        segment_on_cluster("default", nuclei, out, scheduler=client, block_size=BLOCK, overlap=OVERLAP,
                           cancel=lambda: True)


def test_command_line_on_a_scheduler_and_on_local_workers(client, tmp_path, nuclei):
    import imageio.v3 as iio

    images = tmp_path / "images"
    images.mkdir()
    iio.imwrite(images / "a.png", nuclei)
    iio.imwrite(images / "b.png", nuclei[::-1, 20:])
    address = client.scheduler.address
    assert main(["predict", str(images), "-o", str(tmp_path / "cluster"), "--format", "zarr", "--block-size", "128",
                 "--scheduler", address, "-q"]) == 0
    assert main(["predict", str(images), "-o", str(tmp_path / "one"), "--format", "zarr", "--block-size", "128", "-q"]) == 0
    for name in ("a", "b"):
        got = zarr.open_group(str(tmp_path / "cluster" / f"{name}.zarr"))["0"]
        want = zarr.open_group(str(tmp_path / "one" / f"{name}.zarr"))["0"]
        assert got.chunks == (128, 128) and np.array_equal(got[:], want[:])
    assert main(["predict", str(images / "a.png"), "-o", str(tmp_path / "local"), "--format", "zarr", "--block-size", "128",
                 "--workers", "1", "-q"]) == 0
    assert np.array_equal(zarr.open_group(str(tmp_path / "local" / "a.zarr"))["0"][:],
                          zarr.open_group(str(tmp_path / "one" / "a.zarr"))["0"][:])
    assert main(["predict", str(images), "-o", str(tmp_path / "png"), "--workers", "2"]) == 2
    assert not (tmp_path / "png").exists()
