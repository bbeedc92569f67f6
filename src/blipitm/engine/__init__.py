"""Joins model, processing and checkpoint; the only layer that knows about device and dtype.

:mod:`blipitm.engine.options` is torch-free and the CLI's ``--help`` and the server's settings
import it, so this package imports torch only when one of its other names is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blipitm.engine.options import DEFAULT_MODEL, LoadOptions

if TYPE_CHECKING:
    from blipitm.engine.engine import BatchSizes, Engine, ImageFeatures
    from blipitm.engine.loader import DTYPES, load, load_options
    from blipitm.engine.types import MatrixScores, ModelInfo, PairScores, Ranked

_SUBMODULE_OF = {
    "BatchSizes": "engine",
    "Engine": "engine",
    "ImageFeatures": "engine",
    "DTYPES": "loader",
    "load": "loader",
    "load_options": "loader",
    "MatrixScores": "types",
    "ModelInfo": "types",
    "PairScores": "types",
    "Ranked": "types",
}

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "BatchSizes",
    "Engine",
    "ImageFeatures",
    "LoadOptions",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "load",
    "load_options",
]


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
