"""Exceptions raised by napari-unet-studio.

Every failure a user can cause (bad input, a bad model file, cancelling) raises a subclass of
:class:`UnetStudioError` whose message names the cause in one line, so that the command line
and the napari widgets can show it without a traceback.
"""

from __future__ import annotations


class UnetStudioError(Exception):
    """Base class of every error a user can cause; the message is one line naming the cause."""


class InputError(UnetStudioError, ValueError):
    """The image (or its shape, channels, values) cannot be processed."""


class ModelFileError(UnetStudioError):
    """A model file is missing, corrupted, foreign, or refused for safety."""


class Cancelled(UnetStudioError):
    """The work was cancelled by the caller; nothing was written."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)
