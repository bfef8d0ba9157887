"""The active model shared by all U-Net Studio widgets of one viewer (no Qt here)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelState:
    """Holds the active model, its display name and the device choice; notifies listeners."""

    def __init__(self) -> None:
        self.model = None
        self.name = ""
        self.device = "auto"
        self._listeners: list[Callable[[], None]] = []

    def set_model(self, model, name: str) -> None:
        self.model = model
        self.name = name
        self.notify()

    def model_or_default(self):
        """The active model; the shipped default model is loaded (and made active) when there is none.

        Raises :class:`~napari_unet_studio.errors.ModelFileError` when the default is missing.
        """
        if self.model is None:
            from ..checkpoint import load_model

            self.set_model(load_model("default"), "default model")
        return self.model

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
