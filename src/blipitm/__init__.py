"""blipitm: exact, fast BLIP image-text matching.

>>> import blipitm
>>> engine = blipitm.load("Salesforce/blip-itm-base-flickr")
>>> engine.score("dog.jpg", ["a dog on the grass", "a red car"]).itm_probability
>>> blipitm.load_captioner("Salesforce/blip-image-captioning-base").caption("dog.jpg")[0].captions
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blipitm.common.version import __version__
from blipitm.engine import DEFAULT_CAPTION_MODEL, DEFAULT_MODEL
from blipitm.errors import (
    BlipitmError,
    CheckpointError,
    HubUnavailableError,
    ImageTooLargeError,
    InvalidInputError,
)

if TYPE_CHECKING:
    from blipitm.engine import (
        BatchSizes,
        Captioner,
        CaptionResult,
        Engine,
        Explanation,
        ImageFeatures,
        MatrixScores,
        ModelInfo,
        PairScores,
        Ranked,
        Ranking,
        TextFeatures,
        load,
        load_captioner,
    )

__all__ = [
    "DEFAULT_CAPTION_MODEL",
    "DEFAULT_MODEL",
    "BatchSizes",
    "BlipitmError",
    "CaptionResult",
    "Captioner",
    "CheckpointError",
    "Engine",
    "Explanation",
    "HubUnavailableError",
    "ImageFeatures",
    "ImageTooLargeError",
    "InvalidInputError",
    "MatrixScores",
    "ModelInfo",
    "PairScores",
    "Ranked",
    "Ranking",
    "TextFeatures",
    "__version__",
    "load",
    "load_captioner",
]


# The engine's names import torch: they load on first use, so that `blipitm --help` does not.
def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("blipitm.engine"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
