"""Content keys of image inputs, for caches: equal inputs get equal keys, without decoding."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from PIL import Image


def source_key(image: Any) -> str:
    """A hash of an image source's content (the pipeline's ``content_key`` adds prepared images).

    Encoded bytes hash the bytes (so a hit skips decoding); PIL images and arrays hash mode,
    size, palette and pixels. Anything else is rejected by the decoder; it gets a key that never
    repeats.
    """
    h = hashlib.blake2b(digest_size=20)
    if isinstance(image, bytes | bytearray | memoryview):
        h.update(b"bytes:")
        h.update(image)
    elif isinstance(image, np.ndarray):
        h.update(f"array:{image.dtype}:{image.shape}:".encode())
        h.update(np.ascontiguousarray(image).tobytes())
    elif isinstance(image, Image.Image):
        # The palette and transparency entry change the RGB pixels, so they are part of the key.
        palette = image.getpalette() if image.mode in ("P", "PA") else None
        meta = f"pil:{image.mode}:{image.size}:{palette}:{image.info.get('transparency')!r}:"
        h.update(meta.encode())
        # In bands of rows, so a large image is never copied whole just to be hashed.
        width, height = image.size
        rows = max(1, (4 << 20) // max(1, width * 4))
        for top in range(0, height, rows):
            h.update(image.crop((0, top, width, min(top + rows, height))).tobytes())
    else:
        h.update(f"object:{id(image)}:{type(image).__name__}:".encode())
        h.update(os.urandom(16))
    return h.hexdigest()
