"""Joins model, processing and checkpoint; the only layer that knows about device and dtype."""

from blipitm.engine.engine import BatchSizes, Engine, ImageFeatures
from blipitm.engine.load import DEFAULT_MODEL, DTYPES, load
from blipitm.engine.types import MatrixScores, ModelInfo, PairScores, Ranked

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "BatchSizes",
    "Engine",
    "ImageFeatures",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "load",
]
