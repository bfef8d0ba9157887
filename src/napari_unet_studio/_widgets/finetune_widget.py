"""The "Fine-tune" dock widget: train the active model on painted (Image, Labels) pairs.

Training runs on a copy of the active model in a worker thread; progress reaches the GUI
through a queued Qt signal, at most ten times a second. When training ends (or is cancelled)
the best model so far becomes the active model.
"""

from __future__ import annotations

import copy
import time

import numpy as np
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QPainter, QPen, QPolygonF
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
    QVBoxLayout,
    QWidget,
)

from ._common import CancelFlag, RunCancelRow, layers_of, notify_error, set_choices
from ._settings import persist
from ._state import state_for

NONE = "(none)"


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


class LossPlot(QWidget):
    """A minimal live curve of the training loss (and validation AP@0.5 when present)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(110)
        self.losses: list[tuple[int, float]] = []
        self.scores: list[tuple[int, float]] = []

    def reset(self) -> None:
        self.losses.clear()
        self.scores.clear()
        self.update()

    def add(self, record: dict) -> None:
        self.losses.append((record["step"], record["loss"]))
        if "val_ap50" in record:
            self.scores.append((record["step"], record["val_ap50"]))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.GlobalColor.black)
        w, h = self.width(), self.height()
        if len(self.losses) > 1:
            steps = np.array([s for s, _ in self.losses], float)
            loss = np.array([v for _, v in self.losses], float)
            top = np.percentile(loss, 98) or 1.0
            x = (steps - steps.min()) / max(np.ptp(steps), 1) * (w - 10) + 5
            y = h - 5 - np.clip(loss / top, 0, 1) * (h - 10)
            painter.setPen(QPen(Qt.GlobalColor.cyan, 1))
            painter.drawPolyline(QPolygonF([QPointF(a, b) for a, b in zip(x, y)]))
            if self.scores:
                painter.setPen(QPen(Qt.GlobalColor.yellow, 2))
                pts = [QPointF((s - steps.min()) / max(np.ptp(steps), 1) * (w - 10) + 5, h - 5 - v * (h - 10)) for s, v in self.scores]
                painter.drawPolyline(QPolygonF(pts))
        painter.setPen(Qt.GlobalColor.white)
        painter.drawText(5, 14, "loss (cyan), validation AP@0.5 (yellow)")
        painter.end()


class FineTuneWidget(QWidget):
    """Fine-tune the active model on pairs of Image and (painted) Labels layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.worker = None
        self.pairs: list[tuple[str, str, str]] = []
        self.cancel_flag = CancelFlag()
        self.bridge = RecordBridge(self)
        layout = QVBoxLayout(self)
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
        self.progress = QProgressBar(parent=self)
        self.status = QLabel(parent=self)
        self.plot = LossPlot(parent=self)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addStretch()

        self.add_button.clicked.connect(self.add_pair)
        self.remove_button.clicked.connect(self._remove_pair)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.bridge.recorded.connect(self._on_record)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

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

            notify_error(InputError("choose an Image and a Labels layer"))
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

    def _pair(self, image_name: str, labels_name: str, what: str = "labels"):
        """The (image, labels) arrays of two layers, checked; the labels are a copy, since the
        user may keep painting while we train. Raises InputError naming the cause."""
        from ..errors import InputError

        image_layer, labels_layer = self._layer(image_name), self._layer(labels_name)
        if image_layer is None or labels_layer is None:
            raise InputError(f"layer {image_name if image_layer is None else labels_name!r} no longer exists")
        image, lab = np.asarray(image_layer.data), np.array(labels_layer.data)
        if image.shape[:2] != lab.shape:
            raise InputError(f"{what} {labels_name!r} {lab.shape} do not match image {image_name!r} {image.shape[:2]}")
        return image, lab

    def _collect(self):
        """Images, labels and region masks of the chosen pairs (as numpy), or raise InputError."""
        from ..errors import InputError

        if not self.pairs:
            raise InputError("add at least one (Image, Labels) pair to fine-tune on")
        images, labels, regions = [], [], []
        for image_name, labels_name, regions_name in self.pairs:
            image, lab = self._pair(image_name, labels_name)
            mask = None
            if regions_name != NONE:
                shapes = self._layer(regions_name)
                if shapes is None or len(shapes.data) == 0:
                    raise InputError(f"the Shapes layer {regions_name!r} holds no regions")
                mask = np.asarray(shapes.to_masks(mask_shape=lab.shape)).any(axis=0)
            images.append(image)
            labels.append(lab)
            regions.append(mask)
        return images, labels, regions

    def _collect_validation(self):
        """The validation (image, labels) as one-element lists, ``(None, None)`` when not chosen,
        or raise InputError."""
        from ..errors import InputError

        image_name, labels_name = self.val_image.currentText(), self.val_labels.currentText()
        if (image_name == NONE) != (labels_name == NONE):
            raise InputError("choose both a validation image and its labels, or neither")
        if image_name == NONE:
            return None, None
        image, lab = self._pair(image_name, labels_name, what="validation labels")
        return [image], [lab]

    def _check_channels(self, images, val_images, model) -> None:
        """Raise InputError for images the model cannot take; tell the user about conversions."""
        from napari.utils.notifications import show_info

        from ..inference import ImageLayout
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
        from ..training import train

        try:
            images, labels, regions = self._collect()
            val_images, val_labels = self._collect_validation()
            model = copy.deepcopy(self.state.model_or_default())
            self._check_channels(images, val_images or [], model)
        except UnetStudioError as exc:
            notify_error(exc)
            return None
        steps = self.steps.value() or None
        kwargs = dict(
            steps=steps,
            time_budget=None if steps else float(self.budget.value()),
            regions=regions,
            progress=self.bridge,
            cancel=self.cancel_flag,
            lr=self.lr.value() or None,
            ignore_value=None if self.ignore.value() < 0 else self.ignore.value(),
            deep_supervision=self.deep.isChecked(),
            freeze_encoder=self.freeze.isChecked(),
            val_images=val_images,
            val_labels=val_labels,
            device=self.state.device,
            channel_axis=None,
        )
        self.cancel_flag.clear()
        self.plot.reset()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status.setText("preparing (weight maps)…")
        self.buttons.set_busy(True)
        self._name = self.state.name
        self.worker = create_worker(
            train, model, images, labels, **kwargs,
            _connect={"returned": self._on_done, "errored": notify_error, "finished": self._on_finished},
        )
        return self.worker

    def cancel(self) -> None:
        self.cancel_flag.set()
        self.status.setText("cancelling: keeping the best model so far…")

    def _on_record(self, record: dict) -> None:
        self.plot.add(record)
        fraction = record.get("fraction", 0.0)
        self.progress.setValue(int(1000 * fraction))
        eta = record["elapsed"] * (1 - fraction) / fraction if fraction > 0 else float("nan")
        text = f"step {record['step']}, loss {record['loss']:.4f}, ETA {eta:.0f} s"
        if "val_ap50" in record:
            text += f", val AP@0.5 {record['val_ap50']:.3f}"
        self.status.setText(text)

    def _on_done(self, result) -> None:
        model, history = result
        run = model.provenance["training"][-1]
        self.state.set_model(model, f"{self._name} (fine-tuned)")
        from napari.utils.notifications import show_info

        show_info(f"Fine-tuned {run['steps']} steps ({run['stopped']}); the result is now the active model")

    def _on_finished(self) -> None:
        self.buttons.set_busy(False)
