"""blipitm: exact, fast BLIP image-text matching.

>>> import blipitm
>>> engine = blipitm.load("Salesforce/blip-itm-base-flickr")
>>> engine.score("dog.jpg", ["a dog on the grass", "a red car"]).itm_probability
"""

from __future__ import annotations

from blipitm.common.version import __version__
from blipitm.engine import (
    DEFAULT_MODEL,
    BatchSizes,
    Engine,
    ImageFeatures,
    MatrixScores,
    ModelInfo,
    PairScores,
    Ranked,
    load,
)
from blipitm.errors import (
    BlipitmError,
    CheckpointError,
    HubUnavailableError,
    ImageTooLargeError,
    InvalidInputError,
)

__all__ = [
    "DEFAULT_MODEL",
    "BatchSizes",
    "BlipitmError",
    "CheckpointError",
    "Engine",
    "HubUnavailableError",
    "ImageFeatures",
    "ImageTooLargeError",
    "InvalidInputError",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "__version__",
    "load",
]
