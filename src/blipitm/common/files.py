"""Crash-safe file writes: write a temporary sibling, fsync it, then ``os.replace`` it in.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the new one,
never a torn one; leftover ``*.tmp-*`` files are harmless and ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; results and indexes are ordinary files (0666 minus the umask).
_FILE_MODE = 0o666 & ~_umask()


def _temp_for(target: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    with contextlib.suppress(AttributeError, OSError):  # no fchmod on Windows
        os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the whole new
    one, never a part: a temp file in the same folder, fsynced, then renamed over the target."""
    target = Path(path)
    fd, tmp = _temp_for(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def json_bytes(obj: Any) -> bytes:
    """How blipitm writes JSON files: indented UTF-8 with a final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
