import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet_studio.metrics import average_precision, evaluate, iou_matrix, mean_matched_iou, pixel_error


def squares(*boxes, shape=(50, 50)):
    out = np.zeros(shape, np.int32)
    for i, (y, x, s) in enumerate(boxes, start=1):
        out[y : y + s, x : x + s] = i
    return out


def test_perfect_and_empty():
    t = squares((0, 0, 10), (20, 20, 10))
    assert average_precision(t, t, (0.5, 0.9)) == {0.5: 1.0, 0.9: 1.0}
    assert average_precision(np.zeros_like(t), t)[0.5] == 0.0
    assert average_precision(np.zeros_like(t), np.zeros_like(t))[0.5] == 1.0


def test_counts_false_positives_and_negatives():
    t = squares((0, 0, 10), (20, 20, 10), (40, 0, 10))
    p = squares((0, 0, 10), (20, 22, 10), (40, 30, 5))  # exact, IoU 0.67, spurious
    ap = average_precision(p, t, (0.5, 0.75))
    assert ap[0.5] == pytest.approx(2 / (3 + 3 - 2))
    assert ap[0.75] == pytest.approx(1 / (3 + 3 - 1))
    iou = iou_matrix(p, t)
    assert iou.shape == (3, 3) and iou[1, 1] == pytest.approx(80 / 120)


def test_one_to_one_matching_at_low_threshold():
    t = squares((0, 0, 10))
    p = np.zeros_like(t)
    p[0:10, 0:5] = 1
    p[0:10, 5:10] = 2  # two halves, IoU 0.5 each with the one true object: only one may match
    assert average_precision(p, t, (0.3,))[0.3] == pytest.approx(1 / 2)


def test_mean_iou_pixel_error_and_evaluate():
    t = squares((0, 0, 10))
    p = squares((0, 0, 10))
    p[0, :] = 0
    assert mean_matched_iou(p, t) == pytest.approx(0.9)
    assert pixel_error(p, t) == pytest.approx(10 / 2500)
    result = evaluate([p], [t])
    assert set(result) == {"images", "ap50", "ap50_95", "mean_matched_iou", "pixel_error", "rand_error"}
    assert result["ap50"] == 1.0 and 0 <= result["rand_error"] < 0.2


def test_binary_truth_masks_count_as_their_components():
    """ISBI-style truth (cells 255, membranes 0) is scored per cell, not as one object."""
    from napari_unet_studio.metrics import as_instances, evaluate

    truth = np.zeros((40, 40), np.uint8)
    truth[2:18, 2:18] = truth[2:18, 22:38] = truth[22:38, 2:38] = 255
    pred = as_instances(truth)
    assert pred.max() == 3
    scores = evaluate([pred], [truth])
    assert scores["ap50"] == 1.0 and scores["rand_error"] == 0.0 and scores["pixel_error"] == 0.0
    merged = np.where(truth > 0, 1, 0).astype(np.int32)
    merged[18:22, 2:18] = 1  # two cells joined by a bridge: one object where there are two
    worse = evaluate([ndi.label(merged)[0]], [truth])
    assert worse["ap50"] < 1.0 and worse["rand_error"] > 0.0
