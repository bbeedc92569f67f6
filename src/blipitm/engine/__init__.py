"""Joins model, processing and checkpoint; the only layer that knows about device and dtype."""

from blipitm.engine.engine import BatchSizes, Engine
from blipitm.engine.load import DEFAULT_MODEL, load
from blipitm.engine.types import (
    DTYPE_NAMES,
    Dtype,
    ImageFeatures,
    MatrixScores,
    ModelInfo,
    PairScores,
    Ranked,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPE_NAMES",
    "BatchSizes",
    "Dtype",
    "Engine",
    "ImageFeatures",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "load",
]
