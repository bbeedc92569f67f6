"""Joins model, processing and checkpoint; the only layer that knows about device and dtype.

:mod:`blipitm.engine.options` and :mod:`blipitm.engine.types` are torch-free, and the CLI's
``--help`` and the server's settings import them, so this package imports torch only when one of
its other names (the engine, ``load``) is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blipitm.config import ATTN_IMPLS, AttnImpl
from blipitm.engine.options import DEFAULT_CAPTION_MODEL, DEFAULT_MODEL, LoadOptions
from blipitm.engine.types import (
    DTYPE_NAMES,
    WEIGHT_DTYPE_NAMES,
    BatchSizes,
    CaptionResult,
    Dtype,
    ImageFeatures,
    MatrixScores,
    ModelInfo,
    PairScores,
    Ranked,
    Ranking,
    TextFeatures,
    WeightDtype,
)
from blipitm.explain import Explanation

if TYPE_CHECKING:
    from blipitm.engine.autoload import load_any
    from blipitm.engine.captioner import Captioner, load_captioner
    from blipitm.engine.engine import Engine
    from blipitm.engine.loader import load, load_options

_SUBMODULE_OF = {
    "Captioner": "captioner",
    "load_captioner": "captioner",
    "Engine": "engine",
    "load": "loader",
    "load_any": "autoload",
    "load_options": "loader",
}

__all__ = [
    "ATTN_IMPLS",
    "DEFAULT_CAPTION_MODEL",
    "DEFAULT_MODEL",
    "DTYPE_NAMES",
    "WEIGHT_DTYPE_NAMES",
    "AttnImpl",
    "BatchSizes",
    "CaptionResult",
    "Captioner",
    "Dtype",
    "Engine",
    "Explanation",
    "ImageFeatures",
    "LoadOptions",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "Ranking",
    "TextFeatures",
    "WeightDtype",
    "load",
    "load_any",
    "load_captioner",
    "load_options",
]


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
