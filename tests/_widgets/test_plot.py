"""The Fine-tune dock's training chart: round ticks, both curves drawn, the kept step marked."""

import numpy as np
import pytest
from qtpy.QtGui import QColor

from napari_unet_studio._widgets.finetune_widget import LossPlot, nice_ticks


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.0, 0.37, [0.0, 0.1, 0.2, 0.3]),
        (3.0, 117.0, [50.0, 100.0]),
        (-0.01, 0.12, [0.0, 0.05, 0.1]),  # never "-0"
        (0.0, 1000.0, [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]),
    ],
)
def test_nice_ticks_are_round_and_inside(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_nice_ticks_of_an_empty_range():
    assert nice_ticks(5.0, 5.0) == [5.0]


def _colour_pixels(image, colour: QColor) -> int:
    """How many pixels of ``image`` are (close to) ``colour``."""
    ptr = image.constBits()
    ptr.setsize(image.sizeInBytes())
    a = np.frombuffer(ptr, np.uint8).reshape(image.height(), image.bytesPerLine() // 4, 4)[:, : image.width()]
    bgr = np.array([colour.blue(), colour.green(), colour.red()])
    return int((np.abs(a[..., :3].astype(int) - bgr).max(-1) < 40).sum())


def test_chart_draws_loss_scores_and_the_kept_step(qtbot):
    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(360, 170)
    empty = plot.grab().toImage()
    loss_colour, score_colour = QColor(LossPlot.LOSS), QColor(LossPlot.SCORE)
    base_loss, base_score = _colour_pixels(empty, loss_colour), _colour_pixels(empty, score_colour)

    for step in range(1, 101):
        record = {"step": step, "loss": 1.0 / step + 0.1}
        if step % 25 == 0:
            record.update(val_ap50=0.2 + step / 200, best_step=step if step < 100 else 75)
        plot.add(record)
    drawn = plot.grab().toImage()
    # The curves add their colours beyond the legend's swatches.
    assert _colour_pixels(drawn, loss_colour) > base_loss + 50
    assert _colour_pixels(drawn, score_colour) > base_score + 50
    assert plot.best_step == 75
    assert [s for s, _ in plot.scores] == [25, 50, 75, 100]

    plot.reset()
    assert not plot.losses and not plot.scores and plot.best_step is None
    assert _colour_pixels(plot.grab().toImage(), loss_colour) == base_loss
