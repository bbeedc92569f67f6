"""Image decoding, RGB conversion and normalisation against transformers and BLIP references."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from blipitm.config import IMAGE_MEAN, IMAGE_STD
from blipitm.errors import ImageTooLargeError, InvalidInputError
from blipitm.processing.image import (
    DEFAULT_MAX_PIXELS,
    ImageSettings,
    load_image,
    to_rgb,
)
from blipitm.scoring import BLIP, TRANSFORMERS, get_protocol
from image_reference import preprocess, preprocess_batch

SETTINGS = ImageSettings()
FIELD = "images[3]"
LOC = ("images", 3)  # what FIELD says, as the error's loc


# -- image factories (all generated here, deterministic) ------------------------------------------


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels in ``mode``; ``size`` is (width, height)."""
    width, height = size
    rgba = _rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    # Alpha sweeps 0..255 across the image so every blend weight is exercised.
    rgba[..., 3] = np.linspace(0, 255, width * height).reshape(height, width).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _palette(transparency: int | bytes | None) -> Image.Image:
    im = _noise("RGB", (45, 31), seed=1).quantize(16)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


def _png_roundtrip(im: Image.Image, **kwargs: object) -> Image.Image:
    return Image.open(io.BytesIO(_encode(im, "PNG", **kwargs)))


def _i16() -> Image.Image:
    values = _rng(2).integers(0, 65536, (29, 41), dtype=np.uint16)
    return _png_roundtrip(Image.fromarray(values))


def _cmyk_jpeg() -> Image.Image:
    return Image.open(io.BytesIO(_encode(_noise("CMYK", (40, 36), seed=3), "JPEG", quality=90)))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 24), c) for c in [(250, 10, 10), (10, 250, 10), (10, 10, 250)]]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


CASES: dict[str, Callable[[], Image.Image]] = {
    "RGB": lambda: _noise("RGB", (53, 37)),
    "RGBA": lambda: _noise("RGBA", (53, 37)),
    "LA": lambda: _noise("LA", (61, 29)),
    "L": lambda: _noise("L", (29, 61)),
    "P": lambda: _png_roundtrip(_palette(None)),
    "P-transparent-index": lambda: _png_roundtrip(_palette(3)),
    "P-transparency-bytes": lambda: _palette(bytes(range(0, 256, 16))),
    "RGB-transparency-key": lambda: _png_roundtrip(
        Image.new("RGB", (20, 20), (0, 0, 0)), transparency=(0, 0, 0)
    ),
    "CMYK-JPEG": _cmyk_jpeg,
    "1-bit": lambda: _png_roundtrip(_noise("L", (50, 50)).convert("1")),
    "GIF-animated": lambda: Image.open(io.BytesIO(_animated_gif())),
    "1x1": lambda: _noise("RGB", (1, 1)),
    "big-non-square": lambda: _noise("RGB", (1500, 400)),
    "exact-384": lambda: _noise("RGB", (384, 384)),
}


# -- references ---------------------------------------------------------------------------------


def _transformers_ref(im: Image.Image, size: int = 384) -> torch.Tensor:
    """transformers' PIL image processor; BlipImageProcessor may pick torchvision, not installed."""
    processor = transformers.BlipImageProcessorPil(size={"height": size, "width": size})
    return processor(im, return_tensors="pt").pixel_values[0]


def _blip_ref(im: Image.Image, size: int = 384) -> torch.Tensor:
    """BLIP's transform_test, written out: convert, bicubic resize, ToTensor, Normalize."""
    rgb = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / 255
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _ours(image: object, protocol: str, settings: ImageSettings = SETTINGS) -> torch.Tensor:
    rgb = to_rgb(load_image(image), get_protocol(protocol))  # type: ignore[arg-type]
    return preprocess(rgb, settings)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-6 is the contract; bit-identical is what the shared float32 arithmetic gives."""
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-6, f"max abs diff {diff}"
    assert torch.equal(ours, ref), f"not bit-identical (max abs diff {diff})"


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_protocol_matches_blip_image_processor_pil(case: str) -> None:
    im = CASES[case]()
    _assert_close(_ours(im, "transformers"), _transformers_ref(im))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_blip_protocol_matches_blip_transform(case: str) -> None:
    im = CASES[case]()
    _assert_close(_ours(im, "blip"), _blip_ref(im))


def test_protocols_differ_exactly_where_transparency_is() -> None:
    opaque, transparent = _noise("RGB", (40, 40)), _noise("RGBA", (40, 40))
    assert torch.equal(_ours(opaque, "blip"), _ours(opaque, "transformers"))
    assert not torch.equal(_ours(transparent, "blip"), _ours(transparent, "transformers"))


def test_transparency_composites_on_white_for_transformers_and_is_dropped_for_blip() -> None:
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert to_rgb(clear, TRANSFORMERS).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(clear, BLIP).getpixel((0, 0)) == (10, 20, 30)


def test_blip_ignores_the_colour_key_pillow_leaves_on_converted_palette_images() -> None:
    """Gotcha: ``P`` + transparency ``.convert("RGB")`` carries ``info["transparency"]`` as an RGB
    colour key. BLIP's ToTensor ignores it; transformers' processor would composite those pixels
    onto white, so ``processor(im.convert("RGB"))`` is *not* a BLIP reference for such images.
    """
    im = _palette(3)
    converted = im.convert("RGB")
    assert converted.info.get("transparency") is not None
    _assert_close(_ours(im, "blip"), _blip_ref(im))
    assert not torch.equal(_ours(im, "blip"), _transformers_ref(converted))


def test_other_size_matches_reference() -> None:
    settings = ImageSettings(size=224)
    im = _noise("RGBA", (97, 55))
    out = _ours(im, "transformers", settings)
    assert out.shape == (3, 224, 224)
    _assert_close(out, _transformers_ref(im, size=224))
    _assert_close(_ours(im, "blip", settings), _blip_ref(im, size=224))


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    data = _animated_gif()
    loaded = load_image(data)
    assert loaded.convert("RGB").getpixel((5, 5)) == (250, 10, 10)
    path = tmp_path / "anim.gif"
    path.write_bytes(data)
    assert torch.equal(_ours(path, "blip"), _ours(data, "blip"))
    # A caller's PIL image left on a later frame is rewound.
    gif = Image.open(io.BytesIO(data))
    gif.seek(2)
    assert load_image(gif).convert("RGB").getpixel((5, 5)) == (250, 10, 10)


def test_animated_webp_and_apng_use_first_frame() -> None:
    frames = [Image.new("RGBA", (16, 16), c) for c in [(200, 0, 0, 255), (0, 200, 0, 255)]]
    for fmt in ("PNG", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
        assert load_image(data).convert("RGB").getpixel((4, 4)) == (200, 0, 0), fmt


def test_load_image_keeps_original_mode() -> None:
    for case in ("RGBA", "LA", "L", "P-transparent-index", "CMYK-JPEG"):
        im = CASES[case]()
        assert load_image(im).mode == im.mode
    assert load_image(_i16()).mode == "I;16"


# -- 16-bit images (issue 18, item 21): a documented deviation from the references ---------------


def _png16(values: np.ndarray, color_type: int, extra: bytes = b"") -> bytes:
    """A 16-bit PNG (Pillow cannot write 16-bit colour ones): ``values`` uint16 [H, W(, C)]."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    height, width = values.shape[:2]
    big_endian = values.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _grey16_values() -> np.ndarray:
    return _rng(7).integers(0, 65536, (37, 53), dtype=np.uint16)


def test_references_clip_16_bit_grey_to_white() -> None:
    """The fact behind the deviation: Pillow opens a 16-bit grey PNG as ``I;16``, and the
    references' ``convert("RGB")`` clips every value over 255 to white (99.6% of random pixels)."""
    im = Image.open(io.BytesIO(_png16(_grey16_values(), 0)))
    assert im.mode == "I;16"
    white = (np.asarray(im.convert("RGB")) == 255).all(axis=-1).mean()
    assert white > 0.99


@pytest.mark.parametrize("protocol", ["blip", "transformers"])
def test_16_bit_grey_is_scaled_to_8_bits(protocol: str) -> None:
    """Ours: the high byte of each value, as Pillow itself reads 16-bit RGB(A) and grey+alpha PNGs
    (below), then the protocol's usual pipeline. Equal to the references given that 8-bit image."""
    values = _grey16_values()
    eight_bit = Image.fromarray((values >> 8).astype(np.uint8))
    ref = _blip_ref if protocol == "blip" else _transformers_ref
    want = ref(eight_bit)
    for source in (
        _png16(values, 0),  # bytes
        Image.open(io.BytesIO(_png16(values, 0))),  # an opened PNG
        Image.fromarray(values),  # a PIL image built in memory, mode I;16
    ):
        _assert_close(_ours(source, protocol), want)
    assert not torch.equal(want, ref(Image.open(io.BytesIO(_png16(values, 0)))))  # a deviation


def test_16_bit_grey_opened_as_mode_i_by_older_pillow_is_scaled_too() -> None:
    """Older Pillow versions opened 16-bit grey PNGs as mode ``I`` (32-bit); the same pixels."""
    values = _grey16_values()
    as_i = Image.open(io.BytesIO(_png16(values, 0))).convert("I")
    as_i.format = "PNG"
    want = _blip_ref(Image.fromarray((values >> 8).astype(np.uint8)))
    _assert_close(_ours(as_i, "blip"), want)


def test_16_bit_grey_with_a_transparent_value() -> None:
    """tRNS names one 16-bit value: exactly those pixels are transparent (white under
    transformers, their grey under blip), not every pixel that shares its high byte."""
    values = _grey16_values()
    key = int(values[0, 0])
    values[1, 1] = (key & 0xFF00) | ((key + 1) & 0xFF)  # same high byte, another value
    im = Image.open(io.BytesIO(_png16(values, 0, _chunk_trns(key))))
    assert im.info["transparency"] == key
    high = key >> 8
    on_white = to_rgb(im, TRANSFORMERS)
    assert on_white.getpixel((0, 0)) == (255, 255, 255)
    assert on_white.getpixel((1, 1)) == (high,) * 3
    dropped = to_rgb(im, BLIP)
    assert dropped.getpixel((0, 0)) == dropped.getpixel((1, 1)) == (high,) * 3


def _chunk_trns(value: int) -> bytes:
    body = struct.pack(">H", value)
    return struct.pack(">I", 2) + b"tRNS" + body + struct.pack(">I", zlib.crc32(b"tRNS" + body))


@pytest.mark.parametrize(
    ("color_type", "channels", "mode"), [(2, 3, "RGB"), (6, 4, "RGBA"), (4, 2, "RGBA")]
)
def test_pillow_reads_16_bit_colour_and_grey_alpha_pngs_as_8_bit(
    color_type: int, channels: int, mode: str
) -> None:
    """Facts (checked with Pillow 13): 16-bit RGB, RGBA and grey+alpha PNGs open as 8-bit RGB / RGBA
    holding each value's high byte, so they are ordinary images and match the references."""
    values = _rng(8).integers(0, 65536, (21, 34, channels), dtype=np.uint16)
    im = Image.open(io.BytesIO(_png16(values, color_type)))
    assert im.mode == mode
    high = (values >> 8).astype(np.uint8)
    if channels == 2:  # grey + alpha: grey repeated in R, G, B
        high = np.concatenate([high[..., :1]] * 3 + [high[..., 1:]], axis=-1)
    assert np.array_equal(np.asarray(im), high)
    _assert_close(_ours(im, "blip"), _blip_ref(im))
    _assert_close(_ours(im, "transformers"), _transformers_ref(im))


# -- input kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_every_input_kind_gives_identical_tensors(mode: str, tmp_path: Path) -> None:
    im = _noise(mode, (47, 33), seed=5)
    data = _encode(im)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    inputs: list[object] = [
        im,
        Image.open(io.BytesIO(data)),
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        np.asarray(im),
    ]
    expected = {p: _ours(im, p) for p in ("blip", "transformers")}
    for item in inputs:
        assert load_image(item).mode == mode  # type: ignore[arg-type]
        for protocol, want in expected.items():
            assert torch.equal(_ours(item, protocol), want), (type(item), protocol)


def test_path_input_does_not_keep_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    path.write_bytes(_animated_gif())
    loaded = load_image(path)
    path.unlink()  # the decoded frame stays usable after the file is gone
    assert loaded.convert("RGB").getpixel((0, 0)) == (250, 10, 10)


def test_exif_orientation_only_on_request() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(_noise("RGB", (40, 20)), "JPEG", exif=exif)
    assert load_image(data).size == (40, 20)
    assert load_image(data, exif_transpose=True).size == (20, 40)


def test_preprocess_batch_stacks() -> None:
    images = [to_rgb(CASES[c](), BLIP) for c in ("RGB", "L", "1x1")]
    batch = preprocess_batch(images, SETTINGS)
    assert batch.shape == (3, 3, 384, 384)
    assert batch.dtype == torch.float32
    for row, im in zip(batch, images, strict=True):
        assert torch.equal(row, preprocess(im, SETTINGS))
    assert preprocess_batch([], SETTINGS).shape == (0, 3, 384, 384)


def test_threads_give_the_same_results() -> None:
    blobs = [
        _encode(_noise(m, (30 + i, 20 + i), seed=i)) for i, m in enumerate(["RGB", "RGBA"] * 8)
    ]

    def run(blob: bytes) -> torch.Tensor:
        return _ours(blob, "transformers")

    serial = [run(b) for b in blobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(run, blobs))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded, strict=True))


def test_preprocess_and_to_rgb_argument_errors() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess(_noise("L", (8, 8)), SETTINGS)
    with pytest.raises(ValueError, match="protocol"):
        get_protocol("lavis")
    with pytest.raises(InvalidInputError) as info:
        to_rgb(Image.new("La", (4, 4)), BLIP, loc=LOC)
    assert str(info.value).startswith(f"{FIELD}:")


# -- errors ---------------------------------------------------------------------------------------


def _expect_error(image: object, match: str, **kwargs: object) -> InvalidInputError:
    with pytest.raises(InvalidInputError, match=match) as info:
        load_image(image, loc=LOC, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == FIELD
    assert str(info.value).startswith(f"{FIELD}: ")
    return info.value


def _photo_jpeg() -> bytes:
    # Smooth content plus noise, large enough that half the file is half the scan data.
    y, x = np.mgrid[0:256, 0:256]
    base = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.int16)
    noisy = base + _rng(7).integers(-20, 20, base.shape)
    return _encode(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=92)


def test_truncated_jpeg_is_rejected() -> None:
    data = _photo_jpeg()
    load_image(data)  # the whole file is fine
    _expect_error(data[: len(data) // 2], "truncated")


def test_truncated_png_is_rejected() -> None:
    data = _encode(_noise("RGB", (64, 64)))
    _expect_error(data[: len(data) // 2], "cannot")


def test_empty_and_garbage_bytes() -> None:
    _expect_error(b"", "empty")
    err = _expect_error(_rng(9).integers(0, 256, 1000, dtype=np.uint8).tobytes(), "identify")
    assert "JPEG" in str(err) and "PNG" in str(err)  # says which formats are supported


def test_bad_paths(tmp_path: Path) -> None:
    _expect_error(tmp_path / "missing.jpg", "no such image file")
    _expect_error(str(tmp_path), "directory")
    _expect_error("", "empty")
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    _expect_error(text_file, "identify")


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((8, 8, 3), np.uint16), "dtype uint16"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros((8, 8, 3, 1), np.uint8), "shape"),
        (np.zeros((8,), np.uint8), "shape"),
        (np.zeros((0, 0, 3), np.uint8), "zero size"),
        (np.zeros((0, 5), np.uint8), "zero size"),
    ],
)
def test_bad_arrays(array: np.ndarray, match: str) -> None:
    err = _expect_error(array, match)
    if "shape" in match or "dtype" in match:
        assert "(H, W, 3)" in str(err)


def test_non_contiguous_array_accepted() -> None:
    arr = np.asarray(_noise("RGB", (20, 30)))
    flipped = arr[:, ::-1]
    assert np.array_equal(np.asarray(load_image(flipped)), flipped)


@pytest.mark.parametrize("channels", [(), (4,)])
def test_array_is_copied_not_shared(channels: tuple[int, ...]) -> None:
    arr = np.full((6, 5, *channels), 7, np.uint8)  # L and RGBA arrays are ones Pillow would share
    loaded = load_image(arr)
    arr[...] = 200  # a caller reusing its buffer
    assert np.asarray(loaded).max() == 7


@pytest.mark.parametrize("value", [5, None, [1, 2], 3.5, {"image": "x"}])
def test_wrong_types(value: object) -> None:
    err = _expect_error(value, "expected PIL.Image.Image")
    assert type(value).__name__ in str(err)


def test_zero_size_pil_image() -> None:
    _expect_error(Image.new("RGB", (0, 5)), "zero size")


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim ``width``×``height`` (a bomb's header)."""
    data = bytearray(_encode(Image.new("L", (4, 4))))
    # Signature (8) + length (4) + "IHDR" (4): then width, height, ... and the chunk CRC.
    ihdr = bytes(data[12:29])
    patched = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    data[12:29] = patched
    data[29:33] = struct.pack(">I", zlib.crc32(patched))
    return bytes(data)


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    # 9000×9000 is under Pillow's own limit, and the file holds 4×4 pixels of data: decoding would
    # fail as truncated, so ImageTooLargeError proves the check ran on the header alone.
    bomb = _png_with_declared_size(9000, 9000)
    err = _expect_error(bomb, "over the limit", max_pixels=1_000_000)
    assert isinstance(err, ImageTooLargeError)
    assert "81000000" in str(err) and "1000000" in str(err) and "max_pixels" in str(err)


def test_default_limit_and_pillow_limit() -> None:
    # 10000×10000 = 1e8 is over our default (Pillow's value) but under Pillow's hard error (2×).
    with pytest.warns(Image.DecompressionBombWarning):
        err = _expect_error(_png_with_declared_size(10_000, 10_000), "over the limit")
    assert isinstance(err, ImageTooLargeError)
    assert str(DEFAULT_MAX_PIXELS) in str(err)
    # 30000×30000 trips Pillow's own DecompressionBombError during open; still our error type.
    err = _expect_error(_png_with_declared_size(30_000, 30_000), "decompression", max_pixels=None)
    assert isinstance(err, ImageTooLargeError)


def test_real_large_png_against_limit() -> None:
    data = _encode(Image.new("L", (5000, 5000)))  # 25 Mpx of zeros: ~25 KB compressed
    assert len(data) < 100_000
    err = _expect_error(data, "25000000", max_pixels=24_999_999)
    assert isinstance(err, ImageTooLargeError)


@pytest.mark.parametrize("kind", ["bytes", "pil", "array"])
def test_limit_is_inclusive(kind: str) -> None:
    im = _noise("RGB", (125, 80))  # 10 000 pixels
    item = {"bytes": _encode(im), "pil": im, "array": np.asarray(im)}[kind]
    assert load_image(item, max_pixels=10_000).size == (125, 80)  # type: ignore[arg-type]
    assert load_image(item, max_pixels=None).size == (125, 80)  # type: ignore[arg-type]
    err = _expect_error(item, "over the limit", max_pixels=9_999)
    assert isinstance(err, ImageTooLargeError)


# -- long thin images (issue 18, item 15) ---------------------------------------------------------
# Pillow's cost of decoding and resizing grows with the longer side, not only with the pixel
# count: 8 bytes of row pointer per row, a resize buffer of 384 columns by every source row, and
# resampling weights of ~32 bytes per source row or column. A 1x80,000,000 PNG (155 kB) is under
# max_pixels and asked for a 123 GB resize buffer (MemoryError); a 40,000,000x1 one cost 1.6 GB.


@pytest.mark.parametrize("size", [(1, 65_536), (65_536, 1), (80_000_000, 1), (1, 80_000_000)])
def test_a_side_over_65535_is_refused_from_the_header(size: tuple[int, int]) -> None:
    # The file holds 4x4 pixels: decoding would fail as truncated, so this error is the header's.
    err = _expect_error(_png_with_declared_size(*size), "longer side")
    assert isinstance(err, ImageTooLargeError)
    width, height = size
    assert f"{width}x{height}" in str(err) and "65535" in str(err)
    assert "resize" in str(err)  # what to do


@pytest.mark.parametrize("kind", ["pil", "array"])
def test_a_side_over_65535_is_refused_for_decoded_images_too(kind: str) -> None:
    im = Image.new("L", (2, 65_536))
    item = {"pil": im, "array": np.zeros((65_536, 2), np.uint8)}[kind]
    err = _expect_error(item, "longer side")
    assert isinstance(err, ImageTooLargeError)
    # Even with the pixel limit switched off: the limit is on what a resize costs.
    _expect_error(item, "longer side", max_pixels=None)


def test_a_side_of_65535_is_scored_like_the_references() -> None:
    im = _noise("RGB", (3, 65_535))
    _assert_close(_ours(_encode(im), "blip"), _blip_ref(im))


# -- settings -------------------------------------------------------------------------------------


def test_settings_from_transformers_dict() -> None:
    d = transformers.BlipImageProcessorPil().to_dict()
    assert ImageSettings.from_processor_dict(d) == ImageSettings()
    assert ImageSettings.from_processor_dict({"image_processor": d}) == ImageSettings()
    assert ImageSettings.from_processor_dict({}) == ImageSettings()


def test_settings_read_values() -> None:
    d = {"size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5], "image_std": 0.25}
    settings = ImageSettings.from_processor_dict(d)
    assert settings == ImageSettings(size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert ImageSettings.from_processor_dict({"size": 256}).size == 256


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"size": {"height": 384, "width": 512}}, "square"),
        ({"size": {"shortest_edge": 384}}, "height"),
        ({"image_mean": [0.5, 0.5]}, "3 numbers"),
        ({"image_std": [0.5, 0.0, 0.5]}, "positive"),
        ({"resample": 2}, "resample"),
        ({"do_center_crop": True}, "do_center_crop"),
        ({"rescale_factor": 1.0}, "1/255"),
    ],
)
def test_settings_rejects_other_pipelines(d: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageSettings.from_processor_dict(d)
