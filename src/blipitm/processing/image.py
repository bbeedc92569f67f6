"""Images: decode any accepted input, convert to RGB per protocol, resize and normalise.

The three steps are separate because they differ in who decides them: decoding is about trust
(pixel limits, truncated files), RGB conversion is where the two scoring protocols disagree
(DESIGN.md §2: BLIP drops alpha, transformers composites onto white), and the resize/normalise step
is shared by both and must match the references bit for bit.

No global Pillow setting is changed (the pixel limit is a per-call argument; Pillow's block size
only by :func:`return_image_memory_to_os`, which a process opts into) and no shared state is
mutated, so the engine may call all of this from a thread pool; the one exception is that an
animated PIL image handed in is rewound to its first frame.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blipitm.config import DEFAULT_MAX_PIXELS, IMAGE_MEAN, IMAGE_STD
from blipitm.errors import ImageTooLargeError, InvalidInputError, Loc
from blipitm.processing.budget import PixelBudget
from blipitm.scoring import ScoringProtocol

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class ImageSettings:
    """The image side of a checkpoint's preprocessing: output size and normalisation constants.

    Resize filter (bicubic), rescale (1/255) and RGB handling are not settings: BLIP's pipeline
    fixes them, and :meth:`from_processor_dict` rejects configs that ask for anything else rather
    than silently computing different pixels.
    """

    size: int = 384
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise InvalidInputError(f"must be a positive int, got {self.size!r}", loc=("size",))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise InvalidInputError(f"needs 3 values (R, G, B), got {value!r}", loc=(name,))
        if any(s <= 0 for s in self.std):
            raise InvalidInputError(f"values must be positive, got {self.std!r}", loc=("std",))

    @classmethod
    def from_processor_dict(cls, d: dict[str, Any]) -> ImageSettings:
        """Read a Hugging Face ``preprocessor_config.json`` (or ``processor_config.json``) dict.

        ``processor_config.json`` nests the image processor under ``"image_processor"``. Missing
        keys keep the BLIP defaults, as transformers' ``BlipImageProcessor`` would.
        """
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        _check_pipeline_flags(d)
        size = cls.size
        if "size" in d:
            size = _square_size(d["size"])
        mean = _rgb_triple(d["image_mean"], "image_mean") if "image_mean" in d else cls.mean
        std = _rgb_triple(d["image_std"], "image_std") if "image_std" in d else cls.std
        return cls(size=size, mean=mean, std=std)


def _square_size(value: Any) -> int:
    """``size`` as transformers writes it: ``{"height": h, "width": w}`` (or a bare int, older)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        height, width = value["height"], value["width"]
        if height != width:
            raise InvalidInputError(
                f"BLIP resizes to a square, but the config asks for {height}x{width}",
                loc=("size",),
            )
        return int(height)
    raise InvalidInputError(
        f'expected {{"height": N, "width": N}} or an int, got {value!r}', loc=("size",)
    )


def _rgb_triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        value = [value] * 3  # transformers broadcasts a scalar to every channel
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise InvalidInputError(f"expected 3 numbers, got {value!r}", loc=(name,))
    r, g, b = (float(v) for v in value)
    return (r, g, b)


def _check_pipeline_flags(d: dict[str, Any]) -> None:
    """Refuse processor configs that describe a pipeline other than BLIP's."""
    expected: dict[str, Any] = {
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_center_crop": False,
        "resample": int(Image.Resampling.BICUBIC),
    }
    for key, want in expected.items():
        if key in d and d[key] is not None and d[key] != want:
            raise InvalidInputError(
                f"blipitm implements BLIP's fixed preprocessing, which needs {key}={want!r}; "
                f"the config says {d[key]!r}",
                loc=(key,),
            )
    factor = d.get("rescale_factor")
    if factor is not None and abs(float(factor) - 1 / 255) > 1e-12:
        raise InvalidInputError(
            f"blipitm rescales by 1/255 as BLIP does; the config says {factor!r}",
            loc=("rescale_factor",),
        )


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


ImageInput = (
    Image.Image
    | str
    | os.PathLike[str]
    | bytes
    | bytearray
    | memoryview
    | np.ndarray
    | ResizedImage
)


# -- decoding ---------------------------------------------------------------------------------


def load_image(
    image: ImageInput,
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


# -- decode, convert and resize, one image at a time ---------------------------------------------


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

    ``normalize(load_resized(x, ...))`` equals ``preprocess(to_rgb(load_image(x), ...))`` bit
    for bit: the same calls in the same order.
    """
    if isinstance(image, ResizedImage):
        return image.checked(settings, protocol, loc=loc)
    reserved: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if budget is not None:
        reserved = budget.reserve(_declared_pixels(image, loc, max_pixels), loc=loc)
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


def _declared_pixels(image: ImageInput, loc: Loc, max_pixels: int | None) -> int:
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


def content_key(image: Any) -> str:
    """A hash of an image input's content, for caches.

    Encoded bytes hash the bytes (so a hit skips decoding); PIL images and arrays hash mode,
    size, palette and pixels; a :class:`ResizedImage` carries its source's key. Anything else is
    rejected by the decoder; it gets a key that never repeats.
    """
    if isinstance(image, ResizedImage):
        return image.key
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


# Pillow allocates an image in blocks of 16 MiB. glibc serves allocations under 32 MiB from
# per-thread arenas and keeps them after they are freed, so with N decode threads the resident
# memory grows to about N full-size images even while a budget lets two decode at a time (seen:
# +572 MB with 4 threads, where two 6000x6000 images take 288 MB). In one block per image, a
# large image is one allocation that glibc mmaps and unmaps when freed (+296 MB). Small images
# still come from the arenas, bounded by glibc's 32 MiB threshold per thread. Torch's
# allocations are not affected.
_RETURNABLE_BLOCK_BYTES = 1 << 30


def return_image_memory_to_os() -> None:
    """Make Pillow allocate large images in blocks that go back to the OS when freed.

    Process-wide (Pillow's block size), so it is called where blipitm bounds image memory (an
    :class:`~blipitm.Engine` is created, the server starts), never on import. A
    ``PILLOW_BLOCK_SIZE`` set in the environment is respected.
    """
    if "PILLOW_BLOCK_SIZE" in os.environ:
        return
    if Image.core.get_block_size() < _RETURNABLE_BLOCK_BYTES:
        Image.core.set_block_size(_RETURNABLE_BLOCK_BYTES)


# -- RGB conversion ---------------------------------------------------------------------------


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

    A documented deviation from the references (README, "Two protocols"): their
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


# -- resize and normalise ---------------------------------------------------------------------


def preprocess(image_rgb: Image.Image, settings: ImageSettings) -> torch.Tensor:
    """Bicubic-resize to ``size``×``size`` (aspect ignored, no crop), rescale, normalise.

    Returns float32 ``[3, size, size]``: ``normalize(resize(image_rgb))``.
    """
    import torch  # here, not at import: decoding and checks stay torch-free for their callers

    return torch.from_numpy(normalize(resize(image_rgb, settings), settings))


def resize(image_rgb: Image.Image, settings: ImageSettings) -> np.ndarray:
    """Bicubic-resize to ``size``×``size`` (aspect ignored, no crop): uint8 ``[S, S, 3]``.

    The resize is Pillow's, as in every reference.
    """
    if image_rgb.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image (see to_rgb), got mode {image_rgb.mode}")
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


def preprocess_batch(images_rgb: Sequence[Image.Image], settings: ImageSettings) -> torch.Tensor:
    """:func:`preprocess` each image and stack: float32 ``[B, 3, size, size]``."""
    import torch

    if not images_rgb:
        return torch.empty((0, 3, settings.size, settings.size), dtype=torch.float32)
    return torch.stack([preprocess(im, settings) for im in images_rgb])


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
