"""The "Fine-tune" dock widget: train the active model on painted (Image, Labels) pairs.

Training runs on a copy of the active model in a worker thread; progress reaches the GUI
through a queued Qt signal, at most ten times a second. When training ends (or is cancelled)
the best model so far becomes the active model.
"""

from __future__ import annotations

import copy
import time

import numpy as np
from qtpy.QtCore import QObject, QPointF, QRectF, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..provenance import describe_outcome
from ._common import JobSlot, RunCancelRow, camera_of, keep_narrow, layers_of, notify_error, scrolling_layout, set_choices, set_tooltips
from ._layers import checksum, edited_slices, layer_array, level_like, region_masks, region_windows, shown_index, viewed_region
from ._settings import persist
from ._state import state_for

NONE = "(none)"


def _fine_tune_job(model, images, labels, **kwargs):
    """Worker body of a fine-tune: :func:`~napari_unet_studio.training.train` on a copy of
    ``model`` (copying it is long work too, so it happens here, not on the GUI thread)."""
    from ..training import train

    return train(copy.deepcopy(model), images, labels, **kwargs)


def _live_job(model, pairs, options, view, *, cancel, progress):
    """Worker body of live mode: build the training session on a copy of ``model`` (yielded
    first, as ``{"session": session}``), then train and preview until cancelled (see
    :meth:`~napari_unet_studio.training.TrainingSession.live`); returns its best model."""
    from ..training import TrainingSession, widen_input, will_widen

    model = copy.deepcopy(model)
    if will_widen(model, [p[0] for p in pairs]):
        model = widen_input(model)
    session = TrainingSession(model, **options)
    for key, (image, labels, region, previous, name, axes) in enumerate(pairs):
        session.set_pair(key, image, labels, region=region, previous=previous, name=name, axes=axes)
    yield {"session": session}
    return (yield from session.live(view, cancel=cancel, progress=progress))


#: A preview changing at most this share of its window is drawn by recolouring only the
#: changed pixels' bounding box; a larger change redraws the whole layer.
PARTIAL_PREVIEW_SHARE = 0.25


def show_preview(layer, window: tuple[slice, slice], labels: np.ndarray) -> None:
    """Write ``labels`` into the Labels ``layer`` at ``window``, redrawing only what changed.

    Consecutive live previews differ in few pixels, and napari recolours and uploads a whole
    1024x1024 layer on ``refresh()`` (350 ms of frozen GUI under software OpenGL, measured);
    ``data_setitem`` redraws only the changed pixels' bounding box. Its undo history is dropped:
    a preview is replaced every few seconds and has nothing to undo."""
    rows, cols = window
    current = layer.data[rows, cols]
    changed = current != labels
    count = int(np.count_nonzero(changed))
    if count == 0:
        return
    if count > PARTIAL_PREVIEW_SHARE * changed.size:
        current[...] = labels
        layer.refresh()
        return
    ys, xs = np.nonzero(changed)
    layer.data_setitem((ys + (rows.start or 0), xs + (cols.start or 0)), labels[changed])
    for history in (getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)):
        if history is not None:
            history.clear()


def _axes_of(pixels, labels_layer) -> str | None:
    """What a stack's first axis is, for training on it: as Segment took it (when the labels
    are its result), else the image layer's axis labels; None for a 2-D image."""
    from .segment_widget import segmented_axes

    return (segmented_axes(labels_layer) or pixels.axes) if pixels.is_stack else None


class RecordBridge(QObject):
    """Carries training records from the worker thread to the GUI thread, throttled."""

    recorded = Signal(object)

    def __init__(self, parent=None, interval: float = 0.1) -> None:
        super().__init__(parent)
        self.interval = interval
        self._last = 0.0

    def __call__(self, record: dict) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval or "val_ap50" in record or record.get("step") == record.get("steps"):
            self._last = now
            self.recorded.emit(dict(record))


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = np.ceil(low / step - 1e-9) * step
    return [round(float(v), 12) + 0.0 for v in np.arange(first, high + step * 1e-6, step)]  # + 0.0: no "-0"


def _tick_text(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"


class LossPlot(QWidget):
    """The training curve as a small chart: loss against step (left axis), and AP@0.5 of the
    weights' checks (validation or held-out objects, right axis 0-1), with ticks, values and a
    legend; the kept (best) step is marked."""

    LOSS = Qt.GlobalColor.cyan
    SCORE = Qt.GlobalColor.yellow

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.losses: list[tuple[int, float]] = []
        self.scores: list[tuple[int, float]] = []
        self.best_step: int | None = None

    def reset(self) -> None:
        self.losses.clear()
        self.scores.clear()
        self.best_step = None
        self.update()

    def add(self, record: dict) -> None:
        self.losses.append((record["step"], record["loss"]))
        if "val_ap50" in record:
            self.scores.append((record["step"], record["val_ap50"]))
        if "best_step" in record:
            self.best_step = record["best_step"]
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor(20, 20, 24))
        metrics = painter.fontMetrics()
        th = metrics.height()
        left, right, top, bottom = metrics.horizontalAdvance("0.000") + 10, metrics.horizontalAdvance("1.0") + 12, th + 8, th + 8
        w, h = self.width() - left - right, self.height() - top - bottom
        painter.setPen(QColor(220, 220, 220))
        painter.drawText(left, th, "loss")
        painter.setPen(QPen(self.LOSS, 2))
        painter.drawLine(left + metrics.horizontalAdvance("loss ") , th - th // 3, left + metrics.horizontalAdvance("loss ") + 14, th - th // 3)
        legend = "AP@0.5 of the checks"
        lx = left + w - metrics.horizontalAdvance(legend) - 18
        painter.setPen(QPen(self.SCORE, 2))
        painter.drawLine(lx, th - th // 3, lx + 14, th - th // 3)
        painter.setPen(QColor(220, 220, 220))
        painter.drawText(lx + 18, th, legend)
        if w < 20 or h < 20:
            painter.end()
            return
        steps = np.array([s for s, _ in self.losses], float)
        loss = np.array([v for _, v in self.losses], float)
        finite = np.isfinite(loss)
        x0, x1 = (steps.min(), max(steps.max(), steps.min() + 1)) if len(steps) else (0.0, 1.0)
        y1 = float(np.percentile(loss[finite], 98)) * 1.05 if finite.any() else 1.0
        y1 = y1 if y1 > 0 else 1.0

        def px(step):
            return left + (step - x0) / (x1 - x0) * w

        def py(value, high):
            return top + h - min(max(value / high, 0.0), 1.0) * h

        grid = QPen(QColor(70, 70, 78), 1, Qt.PenStyle.DotLine)
        text = QColor(200, 200, 200)
        for v in nice_ticks(0.0, y1):
            painter.setPen(grid)
            painter.drawLine(QPointF(left, py(v, y1)), QPointF(left + w, py(v, y1)))
            painter.setPen(text)
            label = _tick_text(v)
            painter.drawText(QPointF(left - metrics.horizontalAdvance(label) - 4, py(v, y1) + th / 3), label)
        for v in (0.0, 0.5, 1.0):
            painter.setPen(text)
            painter.drawText(QPointF(left + w + 4, py(v, 1.0) + th / 3), f"{v:.1f}")
        for v in nice_ticks(x0, x1):
            painter.setPen(grid)
            painter.drawLine(QPointF(px(v), top), QPointF(px(v), top + h))
            painter.setPen(text)
            label = _tick_text(v)
            painter.drawText(QPointF(px(v) - metrics.horizontalAdvance(label) / 2, top + h + th), label)
        painter.drawText(QPointF(left + w - metrics.horizontalAdvance("step"), top + h + th), "step")
        painter.setPen(QPen(QColor(160, 160, 160), 1))
        painter.drawRect(QRectF(left, top, w, h))
        if finite.sum() > 1:
            painter.setPen(QPen(self.LOSS, 1))
            painter.drawPolyline(QPolygonF([QPointF(px(s), py(v, y1)) for s, v in zip(steps[finite], loss[finite])]))
        if self.scores:
            painter.setPen(QPen(self.SCORE, 2))
            points = [QPointF(px(s), py(v, 1.0)) for s, v in self.scores]
            if len(points) > 1:
                painter.drawPolyline(QPolygonF(points))
            for p in points:
                painter.drawEllipse(p, 2.5, 2.5)
        if self.best_step is not None and len(steps):
            painter.setPen(QPen(QColor(120, 220, 120), 1, Qt.PenStyle.DashLine))
            bx = px(min(max(self.best_step, x0), x1))
            painter.drawLine(QPointF(bx, top), QPointF(bx, top + h))
            painter.drawText(QPointF(bx + 3, top + th), f"kept: step {self.best_step}")
        painter.end()


def _megapixels(pixels) -> str:
    """A layer's size in words, e.g. "20000 x 20000 pixels, 400 megapixels"."""
    shape = pixels.spatial_shape
    return f"{' x '.join(map(str, shape))} pixels, {float(np.prod(shape, dtype=np.float64)) / 1e6:.0f} megapixels"


class FineTuneWidget(QWidget):
    """Fine-tune the active model on pairs of Image and (painted) Labels layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.worker = None
        self.pairs: list[tuple[str, str, str]] = []
        self.job = JobSlot(self)  # closing the viewer cancels a running fine-tune cleanly
        self.cancel_flag = self.job.cancel_flag
        self.bridge = RecordBridge()  # no parent: the worker may still hold it after the dock is gone
        self.live_session = None
        self._live_on = False
        self._live_pending: set = set()
        self._live_layers: list = []
        self._live_pairs: list = []
        self._live_image = None
        layout = scrolling_layout(self)
        form = QFormLayout()
        self.image = QComboBox(parent=self)
        self.labels = QComboBox(parent=self)
        self.regions = QComboBox(parent=self)
        form.addRow("Image", self.image)
        form.addRow("Labels", self.labels)
        form.addRow("Regions (Shapes)", self.regions)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.add_button = QPushButton("Add pair", parent=self)
        self.remove_button = QPushButton("Remove", parent=self)
        row.addWidget(self.add_button)
        row.addWidget(self.remove_button)
        layout.addLayout(row)
        self.pair_list = QListWidget(parent=self)
        self.pair_list.setMaximumHeight(80)
        layout.addWidget(self.pair_list)

        opts = QFormLayout()
        self.val_image = QComboBox(parent=self)
        self.val_labels = QComboBox(parent=self)
        self.steps = QSpinBox(parent=self)
        self.steps.setRange(0, 1_000_000)
        self.steps.setSpecialValueText("use time budget")
        self.budget = QSpinBox(parent=self)
        self.budget.setRange(5, 24 * 3600)
        self.budget.setValue(180)
        self.budget.setSuffix(" s")
        self.lr = QDoubleSpinBox(parent=self)
        self.lr.setDecimals(5)
        self.lr.setRange(0.0, 0.1)
        self.lr.setSingleStep(1e-4)
        self.lr.setSpecialValueText("default")
        self.ignore = QSpinBox(parent=self)
        self.ignore.setRange(-1, 2**31 - 1)
        self.ignore.setSpecialValueText("none")
        self.ignore.setValue(-1)
        self.deep = QCheckBox("U-Net++ deep supervision", parent=self)
        self.deep.setChecked(True)
        self.freeze = QCheckBox("Freeze encoder", parent=self)
        opts.addRow("Validation image", self.val_image)
        opts.addRow("Validation labels", self.val_labels)
        opts.addRow("Steps", self.steps)
        opts.addRow("Time budget", self.budget)
        opts.addRow("Learning rate", self.lr)
        opts.addRow("'Not annotated' label", self.ignore)
        opts.addRow(self.deep)
        opts.addRow(self.freeze)
        layout.addLayout(opts)
        persist("fine-tune", {"steps": self.steps, "time_budget": self.budget, "learning_rate": self.lr,
                             "ignore_value": self.ignore, "deep_supervision": self.deep, "freeze_encoder": self.freeze})
        self.buttons = RunCancelRow("Fine-tune", parent=self)
        self.run_button, self.cancel_button = self.buttons.run_button, self.buttons.cancel_button
        layout.addWidget(self.buttons)
        self.live = QCheckBox("Live: keep training while I paint", parent=self)
        self.live.setToolTip(
            "Train continuously on the pairs above. Strokes are picked up within seconds, and every few seconds "
            "the current weights segment the part of the image you are looking at into a preview layer. "
            "Turning it off makes the best weights the active model."
        )
        layout.addWidget(self.live)
        self.progress = QProgressBar(parent=self)
        self.status = QLabel(parent=self)
        self.plot = LossPlot(parent=self)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addStretch()

        set_tooltips(self, {
            "image": "The image the labels were painted on",
            "labels": "Painted labels: 0 is background, each object its own id. A Segment result you painted over "
                      "counts its changes as corrections, which are learned first. A stack trains on its painted slices",
            "regions": "Optional Shapes layer: train only inside its shapes (paint a few regions fully). Needed for an "
                       "image over 8192 x 8192 pixels: each shape is read and trained on alone, the image never whole",
            "add_button": "Add the chosen image and labels to the training pairs",
            "remove_button": "Remove the selected pair",
            "pair_list": "The (image, labels) pairs fine-tuning trains on",
            "val_image": "Optional held-out image: AP@0.5 on it picks the best weights. Without it, a few painted "
                         "objects are held out automatically",
            "val_labels": "Ground-truth labels of the validation image",
            "steps": "Optimiser steps; 0 uses the time budget instead",
            "budget": "Seconds of training (when Steps is 0)",
            "lr": "Peak learning rate; default 3e-4 when fine-tuning, 1e-3 from scratch",
            "ignore": "A label value meaning 'not annotated' (ignored by the loss); 'none' when every pixel is annotated",
            "deep": "U-Net++ only: train every output head, so the model can be pruned for speed",
            "freeze": "Keep the contracting path fixed: faster, and safer with very few labels",
        })
        keep_narrow(self, labels=(self.status,))
        self.add_button.clicked.connect(self.add_pair)
        self.remove_button.clicked.connect(self._remove_pair)
        self.run_button.clicked.connect(self.run)
        self.live.toggled.connect(self._toggle_live)
        self.cancel_button.clicked.connect(self.cancel)
        self.bridge.recorded.connect(self._on_record)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.state.connect(self._refresh_model)
        self.destroyed.connect(lambda *_: self.state.disconnect(self._refresh_model))
        self._refresh_model()

    def _refresh_model(self) -> None:
        """Options that only some models have are shown only for them."""
        model = self.state.model
        self.deep.setVisible(model is not None and model.arch == "unetpp")

    def _refresh_layers(self, *_) -> None:
        for combo, kind, optional in (
            (self.image, "Image", False),
            (self.labels, "Labels", False),
            (self.regions, "Shapes", True),
            (self.val_image, "Image", True),
            (self.val_labels, "Labels", True),
        ):
            set_choices(combo, ([NONE] if optional else []) + [l.name for l in layers_of(self.viewer, kind)])

    def add_pair(self) -> None:
        """Add the chosen (Image, Labels, Regions) to the training pairs."""
        pair = (self.image.currentText(), self.labels.currentText(), self.regions.currentText())
        if not pair[0] or not pair[1]:
            from ..errors import InputError

            notify_error(InputError("choose an Image and a Labels layer"), self.status)
            return
        if pair not in self.pairs:
            self.pairs.append(pair)
            self.pair_list.addItem(f"{pair[0]} + {pair[1]}" + ("" if pair[2] == NONE else f" in {pair[2]}"))

    def _remove_pair(self) -> None:
        row = self.pair_list.currentRow()
        if row >= 0:
            self.pair_list.takeItem(row)
            del self.pairs[row]

    def _layer(self, name: str):
        return next((l for l in self.viewer.layers if l.name == name), None)

    def _layers_of_pair(self, image_name: str, labels_name: str, what: str = "labels"):
        """The image's pixels (:func:`layer_array`, not read; of a multiscale image the level the
        labels match) and the Labels layer of a pair, checked to match. Raises InputError naming
        the cause."""
        from ..errors import InputError

        image_layer, labels_layer = self._layer(image_name), self._layer(labels_name)
        if image_layer is None or labels_layer is None:
            raise InputError(f"layer {image_name if image_layer is None else labels_name!r} no longer exists")
        shape = tuple(int(n) for n in labels_layer.data.shape)
        pixels = layer_array(image_layer, level_like(image_layer, shape))  # the level the labels were made at
        if pixels.spatial_shape != shape:
            raise InputError(f"{what} {labels_name!r} {shape} do not match image {image_name!r} {pixels.spatial_shape}")
        return pixels, labels_layer

    def _pair(self, image_name: str, labels_name: str, what: str = "labels"):
        """The (image, labels) arrays of two layers, checked, and what a stack's first axis is
        (as Segment took it, else the layer's axis labels; None for 2-D); the labels are a copy,
        since the user may keep painting while we train. Raises InputError naming the cause."""
        pixels, labels_layer = self._layers_of_pair(image_name, labels_name, what)
        if pixels.is_large:
            from ..errors import InputError

            raise InputError(f"{image_name!r} is too large to use whole here ({_megapixels(pixels)}): "
                             "train on regions of it (Regions) instead")
        axes = _axes_of(pixels, labels_layer)
        return np.asarray(pixels.data), np.array(labels_layer.data), axes

    def _collect(self, live: bool = False):
        """Images, labels, region masks, the labels Segment gave (None where the labels layer
        is not a Segment result), names of the chosen pairs and what a stack's first axis is
        (as Segment took it, else the layer's axis labels; None: slices of a volume), or raise
        InputError.

        A large image (more pixels than napari-unet-studio holds in memory comfortably) is never
        read whole: each region of its Regions layer becomes a pair of its own, read from the
        image and the labels alone (not in live mode, which trains on whole pairs), and
        normalised as Segment normalised the whole image (a :class:`~napari_unet_studio.inference.Window`)."""
        from ..errors import InputError
        from ..layout import Window

        if not self.pairs:
            raise InputError("add at least one (Image, Labels) pair to fine-tune on")
        from .segment_widget import segmented_labels

        images, labels, regions, previous, names, stack_axes = [], [], [], [], [], []
        for image_name, labels_name, regions_name in self.pairs:
            pixels, labels_layer = self._layers_of_pair(image_name, labels_name)
            shapes = None
            if regions_name != NONE:
                shapes = self._layer(regions_name)
                if shapes is None or len(shapes.data) == 0:
                    raise InputError(f"the Shapes layer {regions_name!r} holds no regions")
            given = segmented_labels(labels_layer)
            axes = _axes_of(pixels, labels_layer)
            if pixels.is_large:
                if live or shapes is None:
                    raise InputError(
                        f"{image_name!r} is large ({_megapixels(pixels)}): " + (
                            "live mode needs an image that fits in memory; fine-tune on regions of it instead"
                            if live else "draw rectangles around what you painted in a Shapes layer and choose it "
                            "under Regions; only those regions are read and trained on"))
                for index, mask in region_windows(shapes, pixels.spatial_shape, labels_layer):
                    images.append(Window(pixels.data, index[0] if len(index) == 3 else None, *index[-2:],
                                         channel_axis=pixels.channel_axis, axes=axes))
                    stack_axes.append(None)
                    labels.append(np.array(labels_layer.data[index]))
                    regions.append(mask)
                    previous.append(None if given is None else np.asarray(given[index]))
                    rows, cols = index[-2:]
                    where = (f"slice {index[0]}, " if len(index) == 3 else "") + f"rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop}"
                    names.append(f"{image_name} ({where})")
                continue
            image, lab = np.asarray(pixels.data), np.array(labels_layer.data)
            mask = None
            if shapes is not None:
                mask = region_masks(labels_layer, shapes, lab.shape)
            images.append(image)
            labels.append(lab)
            regions.append(mask)
            previous.append(given)
            names.append(image_name)
            stack_axes.append(axes)
        return images, labels, regions, previous, names, stack_axes

    def _scale(self) -> float:
        """The scale to train at: the one Segment saw the first pair's image at (1 for labels
        Segment did not write), so the network learns the image as it segments it."""
        from .segment_widget import segmented_scale

        scales = [segmented_scale(self._layer(labels_name)) for _, labels_name, _ in self.pairs]
        known = [s for s in scales if s is not None]
        if len(set(known)) > 1:
            from napari.utils.notifications import show_info

            from ..rescale import scale_text

            show_info(f"Fine-tune: the pairs were segmented at different scales ({', '.join(scale_text(s) for s in known)}); "
                      f"training at {scale_text(known[0])}, the first pair's")
        return known[0] if known else 1.0

    def _collect_validation(self):
        """The validation (image, labels, what a stack's first axis is) as one-element lists,
        ``(None, None, None)`` when not chosen, or raise InputError."""
        from ..errors import InputError

        image_name, labels_name = self.val_image.currentText(), self.val_labels.currentText()
        if (image_name == NONE) != (labels_name == NONE):
            raise InputError("choose both a validation image and its labels, or neither")
        if image_name == NONE:
            return None, None, None
        image, lab, axes = self._pair(image_name, labels_name, what="validation labels")
        return [image], [lab], [axes]

    def _check_channels(self, images, val_images, model) -> None:
        """Raise InputError for images the model cannot take; tell the user about conversions."""
        from napari.utils.notifications import show_info

        from ..layout import ImageLayout
        from ..normalize import channel_conversion
        from ..training import will_widen

        in_channels = model.in_channels
        if will_widen(model, images):
            show_info("Fine-tune: the model's first convolution is widened to take RGB (starting from its "
                      "luminance weights); the fine-tuned model will take colour images")
            in_channels = 3
        notes = {channel_conversion(ImageLayout(image).n_channels, in_channels) for image in images + val_images}
        for note in sorted(n for n in notes if n):
            show_info(f"Fine-tune: {note}")

    def run(self):
        """Start fine-tuning; returns the worker (or None when nothing started)."""
        from napari.qt.threading import create_worker

        from ..errors import UnetStudioError

        try:
            images, labels, regions, previous, names, axes = self._collect()
            val_images, val_labels, val_axes = self._collect_validation()
        except UnetStudioError as exc:
            notify_error(exc, self.status)
            return None
        if self.state.model is None:  # the choices are fine: load the default, then start
            return self._load_default_then(self.run)
        try:
            model = self.state.model  # copied in the worker
            self._check_channels(images, val_images or [], model)
        except UnetStudioError as exc:
            notify_error(exc, self.status)
            return None
        steps = self.steps.value() or None
        kwargs = dict(
            steps=steps,
            time_budget=None if steps else float(self.budget.value()),
            regions=regions,
            previous=previous,
            names=names,
            axes=axes,
            progress=self.bridge,
            cancel=self.cancel_flag,
            lr=self.lr.value() or None,
            ignore_value=None if self.ignore.value() < 0 else self.ignore.value(),
            deep_supervision=self.deep.isChecked(),
            freeze_encoder=self.freeze.isChecked(),
            val_images=val_images,
            val_labels=val_labels,
            val_axes=val_axes,
            device=self.state.device,
            channel_axis=None,
            scale=self._scale(),
        )
        self.cancel_flag.clear()
        self.plot.reset()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status.setText("preparing (weight maps)…")
        self.buttons.set_busy(True)
        self._name = self.state.name
        self.worker = create_worker(
            _fine_tune_job, model, images, labels, **kwargs,
            _connect={"returned": self._on_done, "errored": lambda exc: notify_error(exc, self.status), "finished": self._on_finished},
        )
        return self.job.track(self.worker)

    def _load_default_then(self, then):
        """Load the shipped default model in a worker (loading is long work), make it active,
        then call ``then`` on the GUI thread. Returns the loading worker."""
        from napari.qt.threading import create_worker

        from ..checkpoint import load_model

        def loaded(model) -> None:
            if self.state.model is None:
                self.state.set_model(model, "default model")
            self.buttons.set_busy(False)
            self.job.worker = None  # done: what follows is a job of its own
            then()

        def failed(exc) -> None:
            self.buttons.set_busy(False)
            self.status.setText("")
            notify_error(exc, self.status)

        self.buttons.set_busy(True)
        self.status.setText("loading the default model…")
        self.worker = create_worker(load_model, "default", _connect={"returned": loaded, "errored": failed})
        return self.job.track(self.worker)

    def cancel(self) -> None:
        """Stop the running fine-tune (or live mode), keeping the best weights so far."""
        self.cancel_flag.set()
        self.status.setText("cancelling: keeping the best model so far…")

    # -- live mode ------------------------------------------------------------------------
    def _toggle_live(self, on: bool) -> None:
        if on:
            if self.start_live() is None:
                self.live.blockSignals(True)
                self.live.setChecked(False)
                self.live.blockSignals(False)
        elif self._live_on:
            self.cancel()

    def start_live(self):
        """Start live mode: train continuously on the pairs, pick up strokes, preview the view.
        Returns the worker (or None when nothing started)."""
        from napari.qt.threading import create_worker

        from ..errors import InputError, UnetStudioError

        if self.job.running:
            notify_error(InputError("wait for the running fine-tune to end, or cancel it"), self.status)
            return None
        try:
            images, labels, regions, previous, names, axes = self._collect(live=True)
        except UnetStudioError as exc:
            notify_error(exc, self.status)
            return None
        if self.state.model is None:
            return self._load_default_then(self.start_live)
        try:
            model = self.state.model  # copied in the worker
            self._check_channels(images, [], model)
        except UnetStudioError as exc:
            notify_error(exc, self.status)
            return None
        options = dict(
            schedule="constant", lr=self.lr.value() or None, device=self.state.device,
            ignore_value=None if self.ignore.value() < 0 else self.ignore.value(),
            deep_supervision=self.deep.isChecked(), freeze_encoder=self.freeze.isChecked(),
            reserve_cores=0,  # measured: napari (0.2 core while painting) leaves room for two threads
            scale=self._scale(),
        )
        pairs = list(zip(images, labels, regions, previous, names, axes))
        self._name = self.state.name
        self._live_on = True
        self._live_pending = set()
        # Strokes and new data on the pairs' Labels layers replace that pair (of a stack, the
        # slices painted) in the session (or wait for it: the session is built in the worker,
        # which took 260 ms of frozen GUI on this thread).
        self._live_layers = []
        for key, (image_name, labels_name, regions_name) in enumerate(self.pairs):
            layer = self._layer(labels_name)

            def changed(event, *, key=key):
                kind = getattr(event, "type", "")
                if self.live_session is None:
                    if kind != "set_data":
                        self._live_pending.add(key)
                    return
                if kind == "set_data":  # a redraw, or an undo or redo (napari sends nothing else for those)
                    self._live_maybe.add(key)
                else:  # a stroke on a stack: only the slices it touched are looked at again (None: all)
                    slices = edited_slices(event) if self._live_pairs[key][1].data.ndim == 3 and kind == "paint" else None
                    dirty = self._live_dirty
                    dirty[key] = None if slices is None or (key in dirty and dirty[key] is None) else sorted(
                        set(dirty.get(key) or ()) | set(slices))
                # read the labels once napari has written them: it sends paint before writing the
                # pixels of a single dab (a brush stroke's event comes after all of them)
                QTimer.singleShot(0, self._send_live_strokes)

            # paint: strokes; data: the layer's data replaced; set_data: every redraw, and undo
            # or redo, so those are checked against what was sent (a checksum of the plane in view)
            for emitter in (layer.events.paint, layer.events.data, layer.events.set_data):
                emitter.connect(changed)
            self._live_layers.append((layer, changed))
        # The preview follows the pair the user works on: the selected image or labels layer of
        # a pair (the first pair's image until one is selected).
        self._live_pairs = [(self._layer(i), self._layer(l)) for i, l, _ in self.pairs]
        self._live_inputs = list(zip(images, regions, names, axes))
        self._live_dirty = {}
        self._live_maybe = set()
        # checksums of the planes the session has, by (pair, slice or None): what a redraw is checked against
        self._live_sent = {(key, None): checksum(lab) for key, lab in enumerate(labels) if lab.ndim == 2}
        self._live_image = self._live_pairs[0][0]
        self._live_view = None
        self._update_live_view()
        camera_of(self.viewer).events.center.connect(self._update_live_view)
        camera_of(self.viewer).events.zoom.connect(self._update_live_view)
        self.viewer.dims.events.current_step.connect(self._update_live_view)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.cancel_flag.clear()
        self.plot.reset()
        # Live mode has no end to show. (An indeterminate, animated bar is avoided: it repaints
        # the window ~30 times a second, and with software OpenGL each repaint redraws the canvas,
        # which took 3x the CPU of training itself under Xvfb.)
        self.progress.setValue(0)
        self.status.setText("live: preparing the painted labels…")
        self.buttons.set_busy(True)
        self.run_button.setEnabled(False)
        self.worker = create_worker(
            _live_job, model, pairs, options, self._current_view, cancel=self.cancel_flag, progress=self.bridge,
            _connect={"yielded": self._on_preview, "returned": self._on_live_done, "errored": lambda exc: notify_error(exc, self.status),
                      "finished": self._on_live_finished},
        )
        return self.job.track(self.worker)

    def _send_live_strokes(self) -> None:
        """Hand the labels painted since the last call to the live session (main thread)."""
        from ..errors import UnetStudioError
        from .segment_widget import segmented_labels

        dirty, self._live_dirty = self._live_dirty, {}
        maybe, self._live_maybe = self._live_maybe, set()
        if self.live_session is None:
            return
        for key in maybe - set(dirty):  # a redraw: send the plane in view only if it differs from what was sent
            layer = self._live_pairs[key][1]
            z = shown_index(layer, self.viewer.dims.point)[0] if layer.data.ndim == 3 else None
            if checksum(layer.data if z is None else layer.data[z]) != self._live_sent.get((key, z)):
                dirty[key] = None if z is None else [z]
        for key, slices in dirty.items():
            layer = self._live_pairs[key][1]
            image, region, name, axes = self._live_inputs[key]
            try:
                self.live_session.set_pair(key, image, layer.data, region=region, previous=segmented_labels(layer),
                                           name=name, slices=slices, axes=axes)
            except UnetStudioError as exc:  # e.g. every painted slice erased: it keeps training on the last ones
                self.status.setText(f"live: {exc}")
            if layer.data.ndim == 2:
                self._live_sent[(key, None)] = checksum(layer.data)
            elif slices is None:  # the whole stack was sent: its slices' checksums are not known
                self._live_sent = {k: v for k, v in self._live_sent.items() if k[0] != key}
            else:
                self._live_sent.update({(key, z): checksum(layer.data[z]) for z in slices})

    def _update_live_view(self, *_) -> None:
        """Remember (main thread) which part of the live image is in view, for the worker: of a
        stack, the slice in view."""
        layer = self._live_image
        if layer is None:
            return
        pixels = layer_array(layer)
        data = pixels.data
        if pixels.is_stack:  # the slice in view, normalised as the stack was for training
            from ..layout import Window

            axes = next((inputs[3] for (image, _), inputs in zip(self._live_pairs, self._live_inputs) if image is layer), None)
            z = shown_index(layer, self.viewer.dims.point)[0]
            data = Window(pixels.data, z, channel_axis=pixels.channel_axis, axes=axes)
        self._live_view = (data, viewed_region(layer, pixels.spatial_shape[-2:]))

    def _on_active_layer(self, event) -> None:
        """The preview follows the pair whose image or labels layer the user selects."""
        for image, labels in self._live_pairs:
            if event.value is image or event.value is labels:
                self._live_image = image
                self._update_live_view()

    def _current_view(self):
        return self._live_view  # read by the worker; replaced (never mutated) by the main thread

    def _on_preview(self, preview: dict) -> None:
        """Take the session once the worker has built it; then show the current weights' labels
        of the viewed region in the preview layer."""
        if "session" in preview:
            self.live_session = preview["session"]
            for key in sorted(self._live_pending):  # strokes painted while the session was built
                self._live_dirty[key] = None
            self._live_pending = set()
            self._send_live_strokes()
            return
        from ..layout import Window

        seen = preview.get("image")
        seen = seen.source.image if isinstance(seen, Window) else seen  # a slice in view: its stack
        image = next((i for i, _ in self._live_pairs if i.data is seen), self._live_image)
        name = f"{image.name} live preview"
        layer = next((l for l in layers_of(self.viewer, "Labels") if l.name == name), None)
        plane = layer_array(image).spatial_shape[-2:]  # of a stack: the slice in view, shown over every slice
        if layer is None or layer.data.shape != plane:
            layer = self.viewer.add_labels(np.zeros(plane, np.int32), name=name, opacity=0.5,
                                           scale=image.scale[-2:], translate=image.translate[-2:])
        show_preview(layer, preview["window"], preview["labels"])
        self.status.setText(f"live: step {preview['step']}, preview of the region in view updated")

    def _on_live_done(self, model) -> None:
        from napari.utils.notifications import show_info

        from ..card import card_of

        run = card_of(model).provenance["training"][-1]
        self.plot.best_step = run["best_step"]  # the last check is not a progress record
        self.plot.update()
        self.state.set_model(model, f"{self._name} (live)")
        show_info(f"Live fine-tune off: {describe_outcome(run)}; the best weights are now the active model")
        self.status.setText(describe_outcome(run))

    def _on_live_finished(self) -> None:
        for layer, changed in self._live_layers:
            for emitter in (layer.events.paint, layer.events.data, layer.events.set_data):
                emitter.disconnect(changed)
        self._live_layers = []
        camera_of(self.viewer).events.center.disconnect(self._update_live_view)
        camera_of(self.viewer).events.zoom.disconnect(self._update_live_view)
        self.viewer.dims.events.current_step.disconnect(self._update_live_view)
        self.viewer.layers.selection.events.active.disconnect(self._on_active_layer)
        self.live_session = None
        self._live_on = False
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.buttons.set_busy(False)
        self.live.blockSignals(True)
        self.live.setChecked(False)
        self.live.blockSignals(False)

    def _on_record(self, record: dict) -> None:
        self.plot.add(record)
        if self._live_on:
            text = f"live: step {record['step']}, loss {record['loss']:.4f}"
            if "val_ap50" in record:
                text += f", AP@0.5 {record['val_ap50']:.3f} ({record.get('val_source', 'validation')})"
            self.status.setText(text)
            return
        fraction = record.get("fraction", 0.0)
        self.progress.setValue(int(1000 * fraction))
        eta = record["elapsed"] * (1 - fraction) / fraction if fraction > 0 else float("nan")
        text = f"step {record['step']}, loss {record['loss']:.4f}, ETA {eta:.0f} s"
        if "val_ap50" in record:
            text += f", val AP@0.5 {record['val_ap50']:.3f}"
        self.status.setText(text)

    def _on_done(self, result) -> None:
        model, history = result
        from ..card import card_of

        run = card_of(model).provenance["training"][-1]
        self.plot.best_step = run["best_step"]
        self.plot.update()
        self.state.set_model(model, f"{self._name} (fine-tuned)")
        from napari.utils.notifications import show_info, show_warning

        show = show_warning if run["stopped"] == "diverged" else show_info
        show(f"Fine-tune: {describe_outcome(run)}; the result is now the active model")
        self.status.setText(describe_outcome(run))
        if run["stopped"] != "steps" and run["stopped"] != "time":
            self.progress.setValue(0)  # no ETA left to show

    def _on_finished(self) -> None:
        self.buttons.set_busy(False)
