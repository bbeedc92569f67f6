"""Exceptions a user can hit. Every message says what went wrong and what to do about it."""

from __future__ import annotations

# Where an input error is, as FastAPI writes it: ("images", 3), ("text_1", "content", 0).
Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """``("images", 3)`` -> ``images[3]``; ``("text_1", "content", 0)`` -> ``text_1.content[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


class BlipitmError(Exception):
    """Base class of every error blipitm raises on purpose."""


class InvalidInputError(BlipitmError, ValueError):
    """An input item (image, text, argument) cannot be used.

    ``loc`` says where the offending item is, e.g. ``("images", 3)``, so that a batch caller (the
    server, a dataset filter) can point at it and go on with the rest; ``field`` is the same as a
    string (``"images[3]"``), or None when the error is about no particular item.
    """

    def __init__(self, message: str, *, loc: Loc = ()) -> None:
        self.loc = loc
        self.reason = message
        super().__init__(f"{self.field}: {message}" if loc else message)

    @property
    def field(self) -> str | None:
        return format_loc(self.loc) if self.loc else None


class ImageTooLargeError(InvalidInputError):
    """An image exceeds the configured pixel limit (decompression-bomb guard)."""


class CheckpointError(BlipitmError):
    """A checkpoint cannot be found, read or loaded strictly."""


class HubUnavailableError(CheckpointError):
    """The Hugging Face hub could not be reached and no usable local copy exists."""
