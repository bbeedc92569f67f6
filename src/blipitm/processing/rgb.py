"""RGB conversion per scoring protocol: where the two protocols disagree about transparency
(docs/architecture.md, "Two protocols": BLIP drops alpha, transformers composites onto white), plus
the documented 16-bit grey deviation (docs/architecture.md, "Preprocessing")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from blipitm.errors import InvalidInputError, Loc
from blipitm.scoring import ScoringProtocol


def to_rgb(image: Image.Image, protocol: ScoringProtocol, *, loc: Loc = ("image",)) -> Image.Image:
    """Convert to an RGB image the way the protocol's reference does.

    Alpha dropped (``blip``): ``image.convert("RGB")``, as BLIP's and LAVIS' datasets do, so a
    transparent pixel shows its stored colour.

    Alpha on white (``transformers``): transformers 5.x ``image_transforms.convert_to_rgb`` (used
    by the PIL image processor backend): an image with an ``A`` band or a ``transparency`` entry
    is converted to RGBA and alpha-composited onto opaque white, then converted to RGB; anything
    else is ``convert("RGB")``. The PIL calls below are the same ones, so the pixels are identical.

    16-bit grey images are first scaled to 8 bits (:func:`_grey_16_to_8_bit`), where the
    references clip them to white: a documented deviation, under both protocols.
    """
    try:
        grey = _grey_16_to_8_bit(image)
        if grey is None:
            return _to_rgb(image, protocol)
        with grey:  # an intermediate: _to_rgb always converts L / LA to a new image
            return _to_rgb(grey, protocol)
    except ValueError as e:
        raise InvalidInputError(f"cannot convert mode {image.mode} to RGB: {e}", loc=loc) from e


def _to_rgb(image: Image.Image, protocol: ScoringProtocol) -> Image.Image:
    if protocol.alpha_on_white and _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # convert() would only copy
    return image.convert("RGB")


_GREY_16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _grey_16_to_8_bit(image: Image.Image) -> Image.Image | None:
    """A 16-bit grey image as 8-bit grey (``L``, or ``LA`` where a value is marked transparent);
    None for every other image.

    A documented deviation from the references (docs/architecture.md, "Preprocessing"): their
    ``convert("RGB")`` clips 16-bit values to 255, so a 16-bit grey PNG is scored as a picture that
    is almost all white. This keeps each value's high byte, which is what Pillow itself does when
    it opens 16-bit RGB, RGBA and grey+alpha PNGs as 8-bit images. Mode ``I`` counts as 16-bit
    grey only from a PNG (older Pillow opened 16-bit grey PNGs as ``I``; a PNG has no other way
    to be ``I``); other ``I`` and ``F`` images (TIFF) keep the references' conversion.
    """
    if image.mode not in _GREY_16_MODES and not (image.mode == "I" and image.format == "PNG"):
        return None
    values = np.asarray(image)  # uint16 in the mode's byte order, or int32 for I
    high = np.empty(values.shape, np.uint8)
    np.right_shift(values, 8, out=high, casting="unsafe")
    grey = Image.fromarray(high)
    key = image.info.get("transparency")
    if not isinstance(key, int) or isinstance(key, bool):
        return grey
    # tRNS names one 16-bit value: exactly its pixels become transparent.
    alpha = np.full(values.shape, 255, np.uint8)
    alpha[values == key] = 0
    with grey, Image.fromarray(alpha) as alpha_band:
        return Image.merge("LA", (grey, alpha_band))


def _has_transparency(image: Image.Image) -> bool:
    # The exact test transformers uses; note it also matches modes like LAB (band "A").
    return "A" in image.getbands() or image.info.get("transparency") is not None
