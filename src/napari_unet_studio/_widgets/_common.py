"""Helpers shared by the widgets: notifications, worker progress bridge, layer choices, dock layout."""

from __future__ import annotations

import threading

from qtpy.QtCore import QEvent, QObject, QSize, Qt, Signal
from qtpy.QtWidgets import QComboBox, QFrame, QHBoxLayout, QPushButton, QScrollArea, QVBoxLayout, QWidget


class ProgressBridge(QObject):
    """Carries ``(done, total)`` from a worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int)

    def __call__(self, done: int, total: int) -> None:
        self.progressed.emit(int(done), int(total))


class RunCancelRow(QWidget):
    """A run button and a Cancel button; while busy, only Cancel is enabled."""

    def __init__(self, label: str, parent=None) -> None:
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.run_button = QPushButton(label, parent=self)
        self.cancel_button = QPushButton("Cancel", parent=self)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        self.cancel_button.setToolTip("Stop within about a second; nothing half-done is kept")
        self.set_busy(False)

    def set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)


class CancelFlag:
    """A thread-safe flag the core polls through its ``cancel`` callable."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def __call__(self) -> bool:
        return self._event.is_set()


class JobSlot:
    """The background job of one dock: its worker and cancel flag.

    When the dock is destroyed (its viewer closed) while the job runs, :meth:`shut_down`
    cancels it, disconnects the worker's signals (so nothing reaches the deleted widgets) and
    waits briefly for it; no error reaches the user.
    """

    #: Seconds to wait for a cancelled job when its dock closes.
    WAIT = 3.0

    def __init__(self, widget) -> None:
        self.cancel_flag = CancelFlag()
        self.worker = None
        widget.destroyed.connect(lambda *_: self.shut_down())  # not a bound method of the dying widget

    @property
    def running(self) -> bool:
        return self.worker is not None and getattr(self.worker, "is_running", False)

    def track(self, worker):
        """Follow ``worker`` (already created and started); returns it."""
        self.worker = worker
        worker.finished.connect(self._forget)
        return worker

    def _forget(self) -> None:
        self.worker = None

    def shut_down(self) -> None:
        """Cancel the running job, cut its signals and wait up to :attr:`WAIT` seconds."""
        worker, self.worker = self.worker, None
        self.cancel_flag.set()
        if worker is None:
            return
        for name in ("returned", "errored", "finished", "yielded", "started"):
            signal = getattr(worker, name, None)
            if signal is not None:
                try:
                    signal.disconnect()
                except (TypeError, RuntimeError):
                    pass
        if hasattr(worker, "quit"):
            worker.quit()
        from qtpy.QtCore import QThreadPool

        QThreadPool.globalInstance().waitForDone(int(self.WAIT * 1000))


class _DockScroll(QScrollArea):
    """Scrolls a dock's controls vertically, never sideways. It asks for the controls' whole
    width; for their whole height as its preferred size, and for at least :attr:`SCREEN_SHARE` of
    the screen's height (all of it if the controls are shorter), so that a dock added below
    another shows its first controls, and four docks still fit in a window on a laptop screen."""

    SCREEN_SHARE = 0.2

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        controls = self.widget()
        if controls is None:
            return super().minimumSizeHint()
        want = controls.minimumSizeHint()
        screen = self.screen()
        least = max(120, int(self.SCREEN_SHARE * screen.availableGeometry().height())) if screen is not None else 160
        return QSize(want.width() + self.verticalScrollBar().sizeHint().width(), min(want.height(), least))

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        controls = self.widget()
        if controls is None:
            return super().sizeHint()
        want = controls.sizeHint()
        return QSize(want.width() + self.verticalScrollBar().sizeHint().width(), want.height())


class _HeightCap(QObject):
    """Keeps ``widget`` no taller than ``controls`` want (their size hint), as they change."""

    def __init__(self, widget, controls) -> None:
        super().__init__(widget)
        self.widget, self.controls = widget, controls

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt naming)
        if event.type() == QEvent.Type.LayoutRequest:
            self.widget.setMaximumHeight(max(self.controls.sizeHint().height(), self.widget.minimumSizeHint().height()))
        return False


def scrolling_layout(widget):
    """The layout for a dock's controls, inside a scroll area that fills ``widget``: when napari
    gives the dock less height than its controls need (two docks stacked on a laptop screen),
    it scrolls instead of squeezing its rows over each other. Returns the controls' layout."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _DockScroll(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    controls = QWidget(area)
    area.setWidget(controls)
    outer.addWidget(area)
    # Never taller than the controls: napari's dock area then gives the rest to the docks
    # beside it instead of leaving it empty under these controls. Followed as they change.
    controls.installEventFilter(_HeightCap(widget, controls))
    return QVBoxLayout(controls)


def keep_narrow(widget, labels=()) -> None:
    """Keep a dock as narrow as its controls, whatever the text it shows: its combo boxes size
    to a dozen characters (a long layer name is elided; the list that opens shows it whole) and
    ``labels`` (messages) wrap. A dock as wide as a one-line message pushes napari's canvas out
    of the window."""
    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(12)
    for label in labels:
        label.setWordWrap(True)


def set_tooltips(widget, tips: dict[str, str]) -> None:
    """Give ``widget``'s controls (attribute name -> text) their tooltips."""
    for name, text in tips.items():
        getattr(widget, name).setToolTip(text)


def notify_error(exc: BaseException, status=None) -> None:
    """Show a user-caused error as a napari notification naming the cause, and in the dock's
    ``status`` label when given (a notification fades; the dock should not go on showing the
    message of an earlier run)."""
    from napari.utils.notifications import show_error

    from ..errors import UnetStudioError

    text = str(exc) if isinstance(exc, UnetStudioError) else f"{type(exc).__name__}: {exc}"
    show_error(text)
    if status is not None:
        status.setText(text)


def camera_of(viewer):
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 (``viewer.camera`` is
    deprecated there), ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def layers_of(viewer, kind: str) -> list:
    """Layers of ``viewer`` whose type name is ``kind`` ("Image", "Labels", ...)."""
    return [layer for layer in viewer.layers if type(layer).__name__ == kind]


def set_choices(combo, names: list[str]) -> None:
    """Refill a combo box with ``names``, keeping the current choice when it is still there."""
    current = combo.currentText()
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
