"""Reading what users hand us without letting it hang, exhaust memory or overflow the stack.

Two traps every data path shares:

- A *path* may name anything: a FIFO (``open`` blocks until a writer appears, forever), a
  character device such as ``/dev/zero`` (``read()`` never ends), or a symlink to either.
  :func:`read_regular_file` opens without blocking, checks the opened file (not the name, so a
  swap between check and open changes nothing) is a regular file, and reads at most a cap.
- *JSON* may nest deeper than the interpreter's stack: ``json.loads("[" * 100_000)`` raises
  ``RecursionError``, which is not a ``ValueError`` and escapes every ``except ValueError``.
  :func:`loads_json` turns it into one, and refuses documents nested deeper than
  :data:`MAX_JSON_DEPTH` before any caller walks them recursively.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

# The largest image file blipitm reads from a path it was given (an index's folders, the CLI's
# IMAGE arguments): far above any real photo (89.5 M pixels as uncompressed 8-bit RGB is 268 MB),
# low enough that a symlink to /dev/zero or a giant file costs nothing.
MAX_IMAGE_FILE_BYTES = 512 << 20

# Deeper than any document blipitm reads (annotations, metadata, request bodies nest < 10).
MAX_JSON_DEPTH = 64


class UnreadableFileError(ValueError):
    """A path that is not a regular file, or a file over its size cap."""


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks followed) of at most ``max_bytes``.

    FIFOs, devices, sockets and folders raise :class:`UnreadableFileError` at once, without
    blocking or reading; so does a file larger than ``max_bytes``, after reading at most one byte
    past the cap (a file growing while read is caught too). ``OSError`` (missing, permission)
    propagates for the caller to word."""
    name = Path(path)
    # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(f"{what} {str(name)!r} is not a regular file ({_kind(st)})")
        if st.st_size > max_bytes:
            raise UnreadableFileError(
                f"{what} {str(name)!r} is {st.st_size} bytes, over the limit of {max_bytes}"
            )
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise UnreadableFileError(
                f"{what} {str(name)!r} is over the limit of {max_bytes} bytes"
            )
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


class JSONDepthError(ValueError):
    """A JSON document nested deeper than :data:`MAX_JSON_DEPTH`."""


def loads_json(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that fails with a ``ValueError`` on every bad document.

    ``json.JSONDecodeError`` (a ``ValueError``) for malformed text, ``UnicodeDecodeError`` (one
    too) for invalid UTF-8, Python's own ``ValueError`` for integers over its 4300-digit limit,
    and :class:`JSONDepthError` for nesting past ``max_depth`` or past the stack."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels") from None
    if _depth_exceeds(value, max_depth):
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether ``value`` nests deeper than ``max_depth``; iterative, so it cannot overflow."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
