"""Resumable state of one evaluation run, kept in a work folder (``OUT/.work``).

Everything expensive is persisted as it finishes: image tokens and embeddings and text
embeddings in preallocated ``.npy`` memory maps whose committed row count lives in a small JSON
file (rows are flushed before the count is replaced, so a SIGKILL at any point loses at most the
batch in flight), and each finished ITM chunk as its own ``.npy`` file written atomically.
``fingerprint.json`` records the inputs (data, model, protocol, dtype, k_test, chunking); a run
whose fingerprint differs wipes the folder and starts over rather than mixing results.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from blipitm.common.files import atomic_save_npy, atomic_write_json, read_json

log = logging.getLogger("blipitm")

FINGERPRINT = "fingerprint.json"


class RowStore:
    """A ``[n, *row_shape]`` array filled in row order, committed batch by batch.

    With ``folder=None`` it lives in memory (no resume); otherwise in ``folder/name.npy`` plus
    ``folder/name.json`` (``{"done": rows}``).
    """

    def __init__(
        self,
        folder: Path | None,
        name: str,
        n: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype[Any] | type,
    ) -> None:
        self._meta = None if folder is None else folder / f"{name}.json"
        self.done = 0
        shape = (n, *row_shape)
        if folder is None:
            self.array: np.ndarray = np.zeros(shape, dtype=dtype)
            return
        meta = folder / f"{name}.json"
        data = folder / f"{name}.npy"
        if meta.exists() and data.exists():
            mm = np.lib.format.open_memmap(data, mode="r+")
            if mm.shape == shape and mm.dtype == np.dtype(dtype):
                self.array = mm
                self.done = int(read_json(meta)["done"])
                return
            del mm
        self.array = np.lib.format.open_memmap(data, mode="w+", dtype=dtype, shape=shape)
        atomic_write_json(meta, {"done": 0})

    def commit(self, rows: np.ndarray) -> None:
        """Write the next ``len(rows)`` rows and make them count."""
        n = len(rows)
        self.array[self.done : self.done + n] = rows
        if isinstance(self.array, np.memmap):
            self.array.flush()
        self.done += n
        if self._meta is not None:
            atomic_write_json(self._meta, {"done": self.done})


class WorkDir:
    """The folder holding one run's resumable state, or nothing (``root=None``: in memory)."""

    def __init__(
        self,
        root: Path | None,
        fingerprint: dict[str, Any],
        same_model: Callable[[dict[str, Any]], bool] = lambda recorded: True,
    ) -> None:
        """``fingerprint`` must match exactly, except its ``"model"`` entry, which
        ``same_model`` judges (model probes differ in the last bits across runs on some GPUs)."""
        self.root = root
        self.resumed = False
        if root is None:
            return
        root.mkdir(parents=True, exist_ok=True)
        fp_file = root / FINGERPRINT
        old = read_json(fp_file) if fp_file.exists() else None
        new = _jsonable(fingerprint)
        if (
            isinstance(old, dict)
            and {k: v for k, v in old.items() if k != "model"}
            == {k: v for k, v in new.items() if k != "model"}
            and same_model(old.get("model") or {})
        ):
            self.resumed = True
            return
        if old is not None:
            log.warning("inputs differ from the interrupted run in %s; starting over", root)
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        atomic_write_json(fp_file, fingerprint)

    def rows(
        self, name: str, n: int, row_shape: tuple[int, ...], dtype: np.dtype[Any] | type
    ) -> RowStore:
        return RowStore(self.root, name, n, row_shape, dtype)

    def load_chunk(self, key: str, n: int) -> np.ndarray | None:
        """A finished chunk's result (``n`` values), or None."""
        if self.root is None:
            return None
        path = self.root / "chunks" / f"{key}.npy"
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # unreadable: recompute (files are written atomically; belt and braces)
        return arr if arr.shape == (n,) else None

    def save_chunk(self, key: str, values: np.ndarray) -> None:
        if self.root is None:
            return
        folder = self.root / "chunks"
        folder.mkdir(exist_ok=True)
        atomic_save_npy(folder / f"{key}.npy", values)

    def load_json(self, name: str) -> Any:
        if self.root is None or not (self.root / name).exists():
            return None
        return read_json(self.root / name)

    def save_json(self, name: str, obj: Any) -> None:
        if self.root is not None:
            atomic_write_json(self.root / name, obj)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparison."""
    import json

    return json.loads(json.dumps(obj))
