"""The torch form of blipitm's image preprocessing, for tests that compare against it.

The library hands the engine uint8 pixels (``load_resized``) and normalises them into numpy
(``normalize``); these wrappers give the float32 tensors BLIP's ``transform_test`` gives, built from
the library's own ``resize`` and ``normalize``, so a test can hold either side against a reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from blipitm.processing.image import ImageSettings, normalize, resize


def preprocess(image_rgb: Image.Image, settings: ImageSettings) -> torch.Tensor:
    """Bicubic-resize to ``size``×``size`` (aspect ignored, no crop), rescale, normalise.

    Returns float32 ``[3, size, size]``: ``normalize(resize(image_rgb))``.
    """
    return torch.from_numpy(normalize(resize(image_rgb, settings), settings))


def preprocess_batch(images_rgb: Sequence[Image.Image], settings: ImageSettings) -> torch.Tensor:
    """:func:`preprocess` each image and stack: float32 ``[B, 3, size, size]``."""
    if not images_rgb:
        return torch.empty((0, 3, settings.size, settings.size), dtype=torch.float32)
    return torch.stack([preprocess(im, settings) for im in images_rgb])
