"""Decoding under limits: any accepted input to a fully decoded PIL image in its own mode.

Decoding is about trust: an allow-list of formats, pixel and side limits checked from the header
before any pixel data is decoded, truncated and corrupt files refused with one error type. No
global Pillow setting is changed (the pixel limit is a per-call argument) and no shared state is
mutated, so this may run in a thread pool; the one exception is that an animated PIL image handed
in is rewound to its first frame.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blipitm.config import DEFAULT_MAX_PIXELS
from blipitm.errors import ImageTooLargeError, InvalidInputError, Loc

# Formats we let Pillow try. An allow-list rather than "whatever Pillow can open": some plugins are
# unsafe on untrusted input (EPS runs Ghostscript) and the formats left out are not photo formats.
# JPEG includes camera MPO files; AVIF is used where this Pillow build has it.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "AVIF")

# Errors Pillow's decoders raise on corrupt or truncated data (SyntaxError and struct.error come
# from header parsers, EOFError from frame iteration, the rest from the C decoders).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)

# The longest side accepted, whatever ``max_pixels`` says (None included): the most that JPEG, GIF
# and TGA can store, and beyond any camera or ordinary panorama. Pillow's cost of decoding and
# resizing grows with the longer side, not only with the pixel count: a row pointer of 8 bytes
# per row, a first (horizontal) resize pass that allocates ``size`` columns by every source row,
# and resampling weights of ~32 bytes per source row or column. So a 1x80,000,000 grey PNG
# (155 kB, under max_pixels) took 1.8 GB and then failed to allocate a 123 GB resize buffer
# (MemoryError), and a 40,000,000x1 one was scored for 1.5 GB of peak RSS. At this limit the
# thinnest image accepted, 1x65535, costs 3 MB.
MAX_IMAGE_SIDE = 65_535

_ACCEPTED_TYPES = "PIL.Image.Image, a file path (str or os.PathLike), bytes, or a numpy uint8 array"

# What :func:`load_image` decodes. The pipeline's ``ImageInput`` (image.py) adds images already
# resized for the model, which are not decoded again.
SourceImage = Image.Image | str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray


def load_image(
    image: SourceImage,
    *,
    loc: Loc = ("image",),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> Image.Image:
    """Decode ``image`` fully and return it in its original mode (first frame if animated).

    RGB conversion is left to :func:`to_rgb` because the protocols do it differently. The pixel
    limit is checked against the size in the file header, before any pixel data is decoded, so a
    small file that declares a huge canvas costs nothing. ``max_pixels=None`` disables the check
    (Pillow's global ``Image.MAX_IMAGE_PIXELS`` still applies to files; we never change it).
    A side longer than :data:`MAX_IMAGE_SIDE` is refused whatever ``max_pixels`` is, also from
    the header: such images cost memory out of proportion to their pixels.

    EXIF orientation is ignored unless ``exif_transpose`` is set, because BLIP, LAVIS and
    transformers all ignore it and the scores would otherwise differ from theirs.

    Every failure is an :class:`InvalidInputError` (or :class:`ImageTooLargeError`) whose message
    starts with ``format_loc(loc)``.
    """
    if isinstance(image, Image.Image):
        result = _from_pil(image, loc, max_pixels)
    elif isinstance(image, np.ndarray):
        result = _from_array(image, loc, max_pixels)
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise InvalidInputError("image data is empty (0 bytes)", loc=loc)
        result = _decode(io.BytesIO(data), loc, max_pixels, source="image data")
    elif isinstance(image, str | os.PathLike):
        result = _from_path(image, loc, max_pixels)
    else:
        raise InvalidInputError(f"expected {_ACCEPTED_TYPES}; got {type(image).__name__}", loc=loc)
    if exif_transpose:
        try:
            result = ImageOps.exif_transpose(result)
        except _DECODE_ERRORS as e:
            raise InvalidInputError(f"cannot apply EXIF orientation: {e}", loc=loc) from e
    return result


def _from_path(path: str | os.PathLike[str], loc: Loc, max_pixels: int | None) -> Image.Image:
    name = os.fspath(path)
    if not name:
        raise InvalidInputError("image path is an empty string", loc=loc)
    try:
        with open(name, "rb") as fp:
            return _decode(fp, loc, max_pixels, source=f"file {name!r}")
    except FileNotFoundError:
        raise InvalidInputError(f"no such image file: {name!r}", loc=loc) from None
    except IsADirectoryError:
        raise InvalidInputError(f"{name!r} is a directory, not an image file", loc=loc) from None
    except OSError as e:  # permissions and the like; decoding errors are handled in _decode
        raise InvalidInputError(f"cannot open image file {name!r}: {e}", loc=loc) from e


def _decode(fp: Any, loc: Loc, max_pixels: int | None, *, source: str) -> Image.Image:
    """Open lazily, check the header size, then decode the first frame into memory.

    The result no longer reads from ``fp`` (the caller closes it), so no file handles leak and the
    image can be used after the file is gone.
    """
    return _load_first_frame(_open(fp, loc, max_pixels, source=source), loc, source)


def _open(fp: Any, loc: Loc, max_pixels: int | None, *, source: str) -> Image.Image:
    """Identify ``fp`` and check the size its header declares; no pixel data is decoded yet."""
    try:
        im = Image.open(fp, formats=_open_formats())
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{source} exceeds Pillow's global decompression-bomb limit ({e}); this limit is "
            "PIL.Image.MAX_IMAGE_PIXELS, which blipitm never changes",
            loc=loc,
        ) from e
    except UnidentifiedImageError as e:
        raise InvalidInputError(
            f"cannot identify {source} as an image; supported formats: {_supported_formats()}",
            loc=loc,
        ) from e
    except _DECODE_ERRORS as e:
        raise InvalidInputError(f"cannot read {source}: {e}", loc=loc) from e
    try:
        _check_size(im.size, loc, max_pixels)
    except BaseException:
        im.close()
        raise
    return im


def _load_first_frame(im: Image.Image, loc: Loc, source: str) -> Image.Image:
    """Decode the pixels of an opened image (its first frame); ``im`` is closed on failure."""
    try:
        _decode_pixels(im, loc, source)
        if not _is_animated(im, loc, source):
            return im
        # Multi-frame images keep a reference to the file for seeking; a copy of the decoded first
        # frame (pixels, palette and ``info`` included) lets the file and its buffer go.
        frame = im.copy()
    except BaseException:
        im.close()
        raise
    im.close()
    return frame


def _is_animated(im: Image.Image, loc: Loc, source: str) -> bool:
    # ``is_animated`` only looks for a second frame (``n_frames`` would walk the whole file), but
    # it still parses, so a corrupt tail can fail here.
    try:
        return bool(getattr(im, "is_animated", False))
    except _DECODE_ERRORS as e:
        raise InvalidInputError(f"cannot decode {source} (corrupt frames?): {e}", loc=loc) from e


def _decode_pixels(im: Image.Image, loc: Loc, source: str) -> None:
    """``im.load()`` with decoder failures turned into one error type.

    Truncated files raise here because we leave ``ImageFile.LOAD_TRUNCATED_IMAGES`` at its default
    (False); a process that sets it to True globally makes Pillow pad truncated files silently.
    """
    try:
        if im.tell() != 0:
            im.seek(0)
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source}: {e}", loc=loc) from e
    except _DECODE_ERRORS as e:
        raise InvalidInputError(
            f"cannot decode {source} (truncated or corrupt?): {e}", loc=loc
        ) from e


def _from_pil(im: Image.Image, loc: Loc, max_pixels: int | None) -> Image.Image:
    """A caller's image is used as is (rewound to frame 0 if animated), still size-checked."""
    _check_size(im.size, loc, max_pixels)
    _decode_pixels(im, loc, source="PIL image")
    return im


def _from_array(arr: np.ndarray, loc: Loc, max_pixels: int | None) -> Image.Image:
    expected = "expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4)"
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"{expected}; got dtype {arr.dtype}", loc=loc)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidInputError(f"{expected}; got shape {arr.shape}", loc=loc)
    height, width = arr.shape[:2]
    _check_size((width, height), loc, max_pixels)
    # Pillow picks L / RGB / RGBA from the shape. It would share memory with an L or RGBA array,
    # so it gets a private copy: a caller reusing its buffer must not change an image in flight.
    return Image.fromarray(np.array(arr, order="C"))


def _check_size(size: tuple[int, int], loc: Loc, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})", loc=loc)
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageTooLargeError(
            f"image is {width}x{height} pixels: its longer side is over {MAX_IMAGE_SIDE} "
            "pixels, which no photo has and which costs far more memory to decode and resize "
            "than its pixel count suggests; crop or resize it so that neither side exceeds "
            f"{MAX_IMAGE_SIDE} pixels (the model sees every image at its input size anyway)",
            loc=loc,
        )
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} "
            "(a decompression-bomb guard); raise the max_pixels setting to accept it",
            loc=loc,
        )


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` that this Pillow build can open (passing others is a KeyError)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _supported_formats() -> str:
    return ", ".join(_open_formats())


def declared_pixels(image: SourceImage, loc: Loc, max_pixels: int | None) -> int:
    """Pixels ``image`` will have once decoded, from its header only; 0 where unknown (then
    :func:`load_image` reports the problem)."""
    if isinstance(image, Image.Image):
        return image.width * image.height
    if isinstance(image, np.ndarray):
        return int(image.shape[0] * image.shape[1]) if image.ndim >= 2 else 0
    if isinstance(image, bytes | bytearray | memoryview):
        if not len(image):
            return 0
        im = _open(io.BytesIO(image), loc, max_pixels, source="image data")
        with contextlib.closing(im):
            return im.width * im.height
    if isinstance(image, str | os.PathLike) and os.fspath(image):
        name = os.fspath(image)
        try:
            fp = open(name, "rb")  # noqa: SIM115 - closed below; open errors are load_image's
        except OSError:
            return 0
        with fp, contextlib.closing(_open(fp, loc, max_pixels, source=f"file {name!r}")) as im:
            return im.width * im.height
    return 0
