"""The active model shared by all U-Net Studio widgets of one viewer (no Qt here)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: Versions of the active model kept for going back (each holds its weights in memory).
MAX_VERSIONS = 20


class ModelState:
    """Holds the active model, its display name, its versions and the device choice; notifies
    listeners.

    Every model made active (loaded, created, fine-tuned, or live-trained, finished or
    cancelled) becomes a version; :meth:`revert` makes an earlier one active again.
    """

    def __init__(self) -> None:
        self.model = None
        self.name = ""
        self.device = "auto"
        self.versions: list[tuple[str, object]] = []
        self._listeners: list[Callable[[], None]] = []

    def set_model(self, model, name: str) -> None:
        self.model = model
        self.name = name
        if model is not None and not any(m is model for _, m in self.versions):
            self.versions.append((name, model))
            del self.versions[:-MAX_VERSIONS]
        self.notify()

    def revert(self, index: int) -> None:
        """Make version ``index`` (of :attr:`versions`) the active model again."""
        name, model = self.versions[index]
        self.model, self.name = model, name
        self.notify()

    def set_device(self, device: str) -> None:
        self.device = device
        self.notify()

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def disconnect(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()


def state_for(viewer) -> ModelState:
    """The shared state of ``viewer`` (created on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = ModelState()
    return state
