"""Helpers shared by the widgets: notifications, worker progress bridge, layer choices."""

from __future__ import annotations

import threading

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QWidget


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


def notify_error(exc: BaseException) -> None:
    """Show a user-caused error as a napari notification naming the cause."""
    from napari.utils.notifications import show_error

    from ..errors import UnetStudioError

    if isinstance(exc, UnetStudioError):
        show_error(str(exc))
    else:
        show_error(f"{type(exc).__name__}: {exc}")


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
