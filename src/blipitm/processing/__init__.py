"""Inputs to tensors: image decoding and normalisation, caption cleanup, tokenization.

No ``nn.Module`` code and no model knowledge lives here; the engine combines these with the model.
"""

from blipitm.processing.budget import PixelBudget
from blipitm.processing.image import (
    DEFAULT_MAX_PIXELS,
    IMAGE_FORMATS,
    ImageInput,
    ImageSettings,
    ResizedImage,
    load_image,
    load_resized,
    normalize,
    preprocess,
    preprocess_batch,
    to_rgb,
)
from blipitm.processing.text import pre_caption, validate_text
from blipitm.processing.tokenizer import Tokenizer, pad

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "ImageInput",
    "ImageSettings",
    "PixelBudget",
    "ResizedImage",
    "Tokenizer",
    "load_image",
    "load_resized",
    "normalize",
    "pad",
    "pre_caption",
    "preprocess",
    "preprocess_batch",
    "to_rgb",
    "validate_text",
]
