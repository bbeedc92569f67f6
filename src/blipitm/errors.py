"""Exceptions a user can hit. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class BlipitmError(Exception):
    """Base class of every error blipitm raises on purpose."""


class InvalidInputError(BlipitmError, ValueError):
    """An input item (image, text, argument) cannot be used.

    ``field`` names the offending item, e.g. ``"images[3]"`` or ``"texts[0]"``, so that a batch
    caller (the server, a dataset filter) can report it and go on with the rest.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class ImageTooLargeError(InvalidInputError):
    """An image exceeds the configured pixel limit (decompression-bomb guard)."""


class CheckpointError(BlipitmError):
    """A checkpoint cannot be found, read or loaded strictly."""


class HubUnavailableError(CheckpointError):
    """The Hugging Face hub could not be reached and no usable local copy exists."""
