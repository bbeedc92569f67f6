"""Images, one at a time: decode, convert to RGB per protocol, resize; the prepared-image record.

Each step has its own module because each is decided by someone else: decoding is about trust
(decode.py: pixel limits, truncated files), RGB conversion is where the two scoring protocols
disagree (rgb.py; docs/architecture.md, "Two protocols"), and the resize/normalise step is shared by
both and must match the references bit for bit (transform.py). The checkpoint's side of it is
image_settings.py, content keys for caches hashing.py. This module joins them and keeps the
processing layer's names importable from one place.

Nothing here changes a global setting or shared state on import or per call, so the engine may
call all of this from a thread pool; Pillow's block size is the entry points' business
(:mod:`blipitm.common.memory`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from blipitm.config import DEFAULT_MAX_PIXELS
from blipitm.errors import InvalidInputError, Loc
from blipitm.processing.budget import PixelBudget
from blipitm.processing.decode import (
    IMAGE_FORMATS,
    MAX_IMAGE_SIDE,
    SourceImage,
    declared_pixels,
    load_image,
)
from blipitm.processing.hashing import source_key
from blipitm.processing.image_settings import ImageSettings
from blipitm.processing.rgb import to_rgb
from blipitm.processing.transform import normalize, resize
from blipitm.scoring import ScoringProtocol

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "MAX_IMAGE_SIDE",
    "ImageInput",
    "ImageSettings",
    "ResizedImage",
    "content_key",
    "load_image",
    "load_resized",
    "normalize",
    "resize",
    "to_rgb",
]


@dataclass(frozen=True, eq=False)
class ResizedImage:
    """An image already decoded, converted to RGB under ``protocol`` and resized to the model's
    input: what the engine needs of it, with the full-size pixels gone.

    ``key`` is the content key of the source it came from (:func:`content_key`), so the engine's
    cache recognises it as that source. Made by :meth:`load`; the server's decode threads make
    these so that its queue holds only model-sized arrays.
    """

    pixels: np.ndarray  # [S, S, 3] uint8
    protocol: ScoringProtocol
    key: str

    @classmethod
    def load(
        cls,
        image: ImageInput,
        settings: ImageSettings,
        protocol: ScoringProtocol,
        *,
        loc: Loc = ("image",),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        budget: PixelBudget | None = None,
    ) -> ResizedImage:
        """:func:`load_resized` plus the source's content key."""
        pixels = load_resized(
            image, settings, protocol, loc=loc, max_pixels=max_pixels, budget=budget
        )
        return cls(pixels, protocol, content_key(image))

    def checked(
        self, settings: ImageSettings, protocol: ScoringProtocol, *, loc: Loc = ("image",)
    ) -> np.ndarray:
        """The pixels, if they were prepared for ``settings`` and ``protocol``; else an error."""
        if self.protocol != protocol:
            raise InvalidInputError(
                f"was prepared under protocol {self.protocol.name!r}, but this model scores "
                f"under {protocol.name!r}; prepare it again with protocol={protocol.name!r}",
                loc=loc,
            )
        want = (settings.size, settings.size, 3)
        if self.pixels.dtype != np.uint8 or self.pixels.shape != want:
            raise InvalidInputError(
                f"expected prepared pixels as uint8 {want} (this model's input size), got "
                f"{self.pixels.dtype} {self.pixels.shape}",
                loc=loc,
            )
        return self.pixels


ImageInput = SourceImage | ResizedImage


def load_resized(
    image: ImageInput,
    settings: ImageSettings,
    protocol: ScoringProtocol,
    *,
    loc: Loc = ("image",),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """Decode ``image``, convert it to RGB under ``protocol`` and resize it: uint8 ``[S, S, 3]``.

    The full-size image lives only inside this call: it is released before the call returns, so
    whoever keeps the results keeps model-sized arrays only (442 kB at 384, whatever the source).
    With ``budget``, the image's pixel count (read from the header, before decoding) is reserved
    while it is full size: the call waits while the budget is spent, and an image larger than
    the whole budget is refused with :class:`ImageTooLargeError`. A :class:`ResizedImage` is
    checked against ``settings`` and ``protocol`` and its pixels returned.

    ``normalize(load_resized(x, ...))`` equals ``normalize(resize(to_rgb(load_image(x), ...)))``
    bit for bit: the same calls in the same order.
    """
    if isinstance(image, ResizedImage):
        return image.checked(settings, protocol, loc=loc)
    reserved: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if budget is not None:
        reserved = budget.reserve(declared_pixels(image, loc, max_pixels), loc=loc)
    with reserved:
        full = load_image(image, loc=loc, max_pixels=max_pixels)
        try:
            rgb = to_rgb(full, protocol, loc=loc)
            try:
                return resize(rgb, settings)
            finally:
                if rgb is not full:
                    rgb.close()
        finally:
            # Free the full-size pixels now rather than whenever the last reference goes; an image
            # the caller handed in stays the caller's.
            if full is not image:
                full.close()


def content_key(image: Any) -> str:
    """A hash of an image input's content, for caches.

    Encoded bytes hash the bytes (so a hit skips decoding); PIL images and arrays hash mode,
    size, palette and pixels; a :class:`ResizedImage` carries its source's key. Anything else is
    rejected by the decoder; it gets a key that never repeats.
    """
    if isinstance(image, ResizedImage):
        return image.key
    return source_key(image)
