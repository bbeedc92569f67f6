"""The index's crash-safe array files: raw, append-only, memory-mappable.

``embeddings.f32`` holds ``[rows, E]`` float32 and ``features.f16`` ``[feature_rows, T, Dv]``
float16, row after row with no header. A batch is written past the committed rows and fsynced
before the catalogue (catalog.py) commits it; the committed counts are the truth, so bytes beyond
them are an unfinished batch, which a writer truncates on open and readers never look at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blipitm.errors import InvalidInputError
from blipitm.retrieval.errors import IndexDamagedError

EMBEDDINGS = "embeddings.f32"
FEATURES = "features.f16"


def read_embeddings(path: Path, rows: int, dim: int) -> np.ndarray:
    """Read-only memory map of the first ``rows`` ``[rows, dim]`` float32 embeddings."""
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.memmap(path, np.float32, "r", shape=(rows, dim))


def read_features(
    path: Path, rows: int, shape: tuple[int, int], feature_rows: Sequence[int]
) -> np.ndarray:
    """Stored float16 vision tokens ``[len(feature_rows), T, Dv]`` of the first ``rows``."""
    t, d = shape
    mm = np.memmap(path, np.float16, "r", shape=(rows, t, d))
    return np.asarray(mm[np.asarray(feature_rows, dtype=np.int64)])


def refuse_non_finite(array: np.ndarray, name: str) -> None:
    """NaN or inf would make every later ranking meaningless: refuse them at the door."""
    finite = np.isfinite(array).all(axis=tuple(range(1, array.ndim)))  # per item
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5].tolist()
        raise InvalidInputError(
            f"items {bad} of this batch have non-finite values (NaN or inf); an index never "
            "stores them",
            loc=(name,),
        )


def write_at(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` and fsync: on disk before the catalogue commits it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_sizes(index: Path, sizes: Sequence[tuple[Path, int]]) -> None:
    """Each file holds at least the bytes committed for it (more is an unfinished batch)."""
    for file, want in sizes:
        if not file.is_file():
            raise IndexDamagedError(f"index {index}: {file.name} is missing; rebuild the index")
        have = file.stat().st_size
        if have < want:
            raise IndexDamagedError(
                f"index {index}: {file.name} has {have} bytes but the index committed "
                f"{want} (was it replaced or truncated?); rebuild the index"
            )


def truncate_uncommitted(sizes: Sequence[tuple[Path, int]]) -> None:
    """Drop bytes a killed writer appended but never committed (sizes checked first)."""
    for file, want in sizes:
        if file.stat().st_size > want:
            with open(file, "r+b") as f:
                f.truncate(want)
                os.fsync(f.fileno())
