"""Resize and normalise: an RGB image to the model's input, shared by both protocols and equal to
the references bit for bit (docs/architecture.md, "Preprocessing")."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from blipitm.processing.image_settings import ImageSettings


def resize(image_rgb: Image.Image, settings: ImageSettings) -> np.ndarray:
    """Bicubic-resize to ``size``×``size`` (aspect ignored, no crop): uint8 ``[S, S, 3]``.

    The resize is Pillow's, as in every reference.
    """
    if image_rgb.mode != "RGB":
        raise ValueError(f"resize expects an RGB image (see to_rgb), got mode {image_rgb.mode}")
    size = settings.size
    return np.asarray(image_rgb.resize((size, size), Image.Resampling.BICUBIC))


def normalize(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """Rescale and normalise uint8 ``[S, S, 3]`` pixels: float32 ``[3, S, S]``.

    The value of each output element depends only on its uint8 input value and channel, so it is
    read from a precomputed table (:func:`_value_table`) that is built with the references' own
    float32 arithmetic; this is exact by construction and much cheaper than float maths per pixel.
    """
    table = _value_table(settings.mean, settings.std)  # [3, 256] float32
    channel = np.arange(3).reshape(3, 1, 1)
    out: np.ndarray = table[channel, pixels.transpose(2, 0, 1)]  # [3, S, S] float32
    return out


@functools.lru_cache(maxsize=16)
def _value_table(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """``table[c, v]`` = normalised value of uint8 ``v`` in channel ``c``, float32 ``[3, 256]``.

    transformers (PIL backend) rescales as ``float32(float64(v) * (1/255))`` and then normalises
    in float32 as ``(x - float32(mean)) / float32(std)``; BLIP/torchvision compute
    ``float32(v) / 255`` and the same normalisation. The two rescales agree for all 256 values, so
    one table serves both. It is read-only because it is shared between threads.
    """
    values = np.arange(256, dtype=np.float64)
    rescaled = (values * (1 / 255)).astype(np.float32)  # [256]
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1)
    table = (rescaled[None, :] - mean32) / std32  # [3, 256] float32
    table.setflags(write=False)
    return table
