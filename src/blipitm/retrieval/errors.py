"""Errors specific to on-disk indexes."""

from __future__ import annotations

from blipitm.errors import BlipitmError


class IndexFormatError(BlipitmError):
    """A folder is not a blipitm index, or its files are inconsistent."""


class IndexDamagedError(IndexFormatError):
    """An index's files no longer match what was committed (checksums, counts, unreadable data),
    or an indexed image can no longer be read. Rebuilding (or restoring) is the fix."""


class IndexMismatchError(BlipitmError):
    """The engine is not the model the index was built with (weights or protocol differ)."""


class IndexBusyError(BlipitmError):
    """Another process is writing the index."""
