"""Memory held for images is bounded by design, not by request size (issue 8, item 1).

Images are decoded, converted and resized one at a time per decode thread, and a budget of
full-size pixels in flight makes excess work wait. Checked where it is decided (the budget, the
streaming loader, the engine's intake, the server's loader) and where it shows: the peak RSS of a
live ``blipitm serve`` process and of a process that builds an index and runs an evaluation,
read from ``/proc/PID/status`` after resetting the high-water mark.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.errors import ImageTooLargeError, InvalidInputError
from blipitm.processing import (
    ImageSettings,
    PixelBudget,
    ResizedImage,
    load_image,
    load_resized,
    normalize,
    to_rgb,
)
from blipitm.processing.image import content_key
from blipitm.scoring import BLIP, TRANSFORMERS, get_protocol
from blipitm.server.errors import APIError
from blipitm.server.images import ImageLoader
from blipitm.server.metrics import Metrics
from image_reference import preprocess
from server_helpers import REPO, ServerProcess, cli_server, data_uri, png_bytes

MB = 1 << 20
SIDE = 6000  # the images: 16 PNGs of 6000x6000, 2.6 MB as a request


def large_png(side: int, color: tuple[int, int, int]) -> bytes:
    """An RGB PNG of one colour that decodes to ``side``x``side`` (120 kB at 6000): after the first
    row every row is filter "Up" with zero differences, which deflate shrinks ~1000x."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    z = zlib.compressobj(9)
    up = b"\x02" + bytes(3 * side)
    idat = z.compress(b"\x00" + bytes(color) * side)
    idat += b"".join(z.compress(up) for _ in range(side - 1)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    rgb = Image.fromarray(arr.squeeze(-1) if bands == 1 else arr)
    return rgb.convert(mode) if rgb.mode != mode else rgb


def encoded(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# -- the streaming loader is exact ----------------------------------------------------------------


def _inputs(tmp_path: Path) -> dict[str, Any]:
    palette = noise("RGB", (31, 23), 3).convert("P")
    palette.info["transparency"] = 7
    path = tmp_path / "la.png"
    path.write_bytes(encoded(noise("LA", (40, 33), 4)))
    return {
        "rgba bytes": encoded(noise("RGBA", (50, 37), 1)),
        "rgb PIL": noise("RGB", (397, 401), 2),
        "palette+transparency PIL": palette,
        "LA path": path,
        "L array": np.asarray(noise("L", (29, 61), 5)),
    }


@pytest.mark.parametrize("protocol", ["blip", "transformers"])
def test_load_resized_is_bit_identical_to_preprocess(tmp_path: Path, protocol: str) -> None:
    settings = ImageSettings()
    budget = PixelBudget(10**6, setting="test")
    for name, item in _inputs(tmp_path).items():
        scoring = get_protocol(protocol)
        want = preprocess(to_rgb(load_image(item), scoring), settings).numpy()
        pixels = load_resized(item, settings, scoring, budget=budget)
        assert pixels.dtype == np.uint8 and pixels.shape == (384, 384, 3), name
        assert np.array_equal(normalize(pixels, settings), want), name
    assert budget.in_use == 0


def test_pil_content_key_covers_the_palette() -> None:
    """Two palette images with the same indices but other colours are different images."""
    a = Image.new("P", (8, 8), 1)
    a.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    b = a.copy()
    b.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert content_key(a) != content_key(b)
    assert content_key(a) == content_key(a.copy())


# -- the budget -----------------------------------------------------------------------------------


def test_budget_makes_excess_decodes_wait() -> None:
    """A budget of one image: while part of it is held, no image can start decoding; once it is
    released, every image is decoded, one at a time, and the budget is whole again."""
    settings = ImageSettings(size=48)
    images = [encoded(noise("RGB", (120, 100), seed)) for seed in range(6)]
    budget = PixelBudget(120 * 100, setting="test")
    held = budget.reserve(1, loc=("held",))
    held.__enter__()
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(load_resized, im, settings, BLIP, loc=("images", i), budget=budget)
            for i, im in enumerate(images)
        ]
        try:
            done, _ = wait(futures, timeout=0.5)
            assert not done, "an image was decoded while the budget was short"
            assert budget.in_use == 1
        finally:
            held.__exit__(None, None, None)
        got = [f.result(timeout=60) for f in futures]
    for im, pixels in zip(images, got, strict=True):
        assert np.array_equal(pixels, load_resized(im, settings, BLIP))
    assert budget.in_use == 0


def _until(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_budget_serves_in_arrival_order() -> None:
    """A large reservation waiting for room is not overtaken by a smaller one that would fit."""
    budget = PixelBudget(100, setting="test")
    order: list[str] = []

    def take(name: str, pixels: int) -> None:
        with budget.reserve(pixels):
            order.append(name)

    held = budget.reserve(60)
    held.__enter__()
    big = threading.Thread(target=take, args=("big", 100))
    late = threading.Thread(target=take, args=("late", 10))
    try:
        big.start()
        assert _until(lambda: len(budget._waiting) == 1), "the large reservation did not wait"
        late.start()
        assert _until(lambda: len(budget._waiting) == 2), "the later one went ahead"
        assert order == []
    finally:
        held.__exit__(None, None, None)
        for thread in (big, late):
            if thread.ident is not None:  # started
                thread.join(10)
    assert order == ["big", "late"] and budget.in_use == 0


def test_one_image_over_the_budget_is_refused() -> None:
    budget = PixelBudget(1000, setting="max_decoded_pixels")
    with pytest.raises(ImageTooLargeError, match=r"images\[2\].*max_decoded_pixels") as info:
        load_resized(
            png_bytes((9, 9, 9), (40, 30)),
            ImageSettings(),
            BLIP,
            loc=("images", 2),
            budget=budget,
        )
    assert info.value.field == "images[2]" and budget.in_use == 0


def _loader(pool: ThreadPoolExecutor, engine: blipitm.Engine) -> ImageLoader:
    """The server's image loader as ``blipitm serve`` builds it, decoding through ``engine``."""
    return ImageLoader(
        prepare=engine.prepare_image,
        executor=pool,
        fetcher=None,
        max_bytes=16 * MB,
        metrics=Metrics(),
    )


def test_server_loader_queues_model_sized_images_and_refuses_one_over_the_budget(
    tiny_ckpt: Path,
) -> None:
    """The server's loader decodes under the engine's one budget (``--max-decoded-pixels``)."""
    engine = blipitm.load(tiny_ckpt, decode_budget_pixels=40 * 30)
    size = engine.image_settings.size
    assert engine.decode_budget is not None
    with ThreadPoolExecutor(4) as pool:
        loader = _loader(pool, engine)
        uris = [data_uri(png_bytes((i, 2 * i, 3 * i), (40, 30))) for i in range(8)]
        got = asyncio.run(loader.load_all(uris, [("input", i) for i in range(8)]))
        assert all(isinstance(r, ResizedImage) and r.pixels.shape == (size, size, 3) for r in got)
        assert engine.decode_budget.in_use == 0
        too_big = data_uri(png_bytes((1, 2, 3), (41, 30)))
        with pytest.raises(APIError) as info:
            asyncio.run(loader.load(too_big, ("input", 3)))
    err = info.value
    assert (err.status, err.code, err.param) == (413, "image_too_large", "input[3]")
    assert "--max-decoded-pixels" in err.message


# -- the engine -----------------------------------------------------------------------------------


def test_engine_takes_resized_images(tiny_ckpt: Path) -> None:
    engine = blipitm.load(tiny_ckpt)
    data = encoded(noise("RGBA", (70, 50), 8))
    resized = ResizedImage.load(data, engine.image_settings, engine.protocol)
    from_bytes = engine.embed_images([data])
    hits = engine.cache.stats.hits
    np.testing.assert_array_equal(engine.embed_images([resized]), from_bytes)
    assert engine.cache.stats.hits == hits + 1  # the same cache entry as the encoded bytes
    fresh = blipitm.load(tiny_ckpt, cache_bytes=0)
    np.testing.assert_array_equal(fresh.embed_images([resized, data])[0], from_bytes[0])
    other = ResizedImage.load(data, engine.image_settings, TRANSFORMERS)
    with pytest.raises(InvalidInputError, match=r"images\[1\].*protocol") as info:
        engine.embed_images([resized, other])
    assert info.value.field == "images[1]"
    wrong_size = ResizedImage.load(data, ImageSettings(size=32), engine.protocol)
    with pytest.raises(InvalidInputError, match=r"images\[0\].*uint8"):
        engine.embed_images([wrong_size])


def test_engine_decode_budget(tiny_ckpt: Path) -> None:
    engine = blipitm.load(tiny_ckpt, decode_threads=4, decode_budget_pixels=120 * 100)
    images = [encoded(noise("RGB", (120, 100), seed)) for seed in range(6)]
    reference = blipitm.load(tiny_ckpt).embed_images(images)
    np.testing.assert_array_equal(engine.embed_images(images), reference)
    assert engine.decode_budget is not None and engine.decode_budget.in_use == 0
    with pytest.raises(ImageTooLargeError, match=r"images\[1\].*decode_budget_pixels"):
        engine.embed_images([images[0], encoded(noise("RGB", (121, 100), 9))])


# -- peak RSS of real processes -------------------------------------------------------------------


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since the last reset) in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.fixture(scope="module")
def large_pngs() -> list[bytes]:
    return [large_png(SIDE, (15 * i, 200, 30)) for i in range(16)]


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    # The default budget, a deadline that a loaded machine cannot hit, and an image limit above
    # the budget so that the budget's own 413 can be seen.
    flags = ["--request-timeout-s", "600", "--max-image-pixels", "100000000"]
    with cli_server(tiny_ckpt, *flags) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"input": [data_uri(png_bytes((1, 2, 3)))]})
        assert r.status_code == 200, r.text  # warm: threads and lazy imports exist before idle
        yield s


def _peak_over_idle(server: ServerProcess, bodies: list[dict[str, Any]]) -> int:
    pid = server.proc.pid
    idle = _memory(pid)["VmRSS"]
    _reset_peak(pid)

    def post(body: dict[str, Any]) -> int:
        return httpx.post(server.url + "/v1/embeddings", json=body, timeout=900).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(post, bodies))
    assert statuses == [200] * len(bodies)
    return _memory(pid)["VmHWM"] - idle


def test_one_request_of_16_large_pngs_stays_under_400mb(
    server: ServerProcess, large_pngs: list[bytes]
) -> None:
    """Issue 8: this request raised peak RSS by 2.4 GB; now by one budget's worth (296 MB)."""
    body = {"input": [data_uri(png) for png in large_pngs]}
    peak = _peak_over_idle(server, [body])
    assert peak < 400 * MB, f"peak RSS rose by {peak / MB:.0f} MB"


@pytest.mark.slow
def test_8_parallel_requests_stay_within_the_documented_budget(
    server: ServerProcess, large_pngs: list[bytes]
) -> None:
    """docs/server.md: about 4 bytes per pixel of --max-decoded-pixels (default 80M), however many
    requests arrive, plus each request's body a few times over (under 6x) while it is parsed."""
    body = {"input": [data_uri(png) for png in large_pngs]}
    body_bytes = len(json.dumps(body))
    peak = _peak_over_idle(server, [body] * 8)
    bound = 4 * 80_000_000 + 8 * 6 * body_bytes
    assert peak < bound, f"peak RSS rose by {peak / MB:.0f} MB, over {bound / MB:.0f} MB"


def test_an_image_over_the_budget_gets_413(server: ServerProcess) -> None:
    big = large_png(9000, (1, 2, 3))  # 81M pixels: under --max-image-pixels, over the budget
    small = data_uri(png_bytes((1, 2, 3)))
    r = httpx.post(
        server.url + "/v1/embeddings", json={"input": [small, data_uri(big)]}, timeout=60
    )
    assert r.status_code == 413
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("input[1]", "image_too_large")
    assert "--max-decoded-pixels" in error["message"]


_JOBS = """
import json, sys
from pathlib import Path
import blipitm
from blipitm.common.memory import apply_memory_policy
from blipitm.evaluation import evaluate
from blipitm.retrieval import build_index

apply_memory_policy()  # as the CLI's index and eval commands do
ckpt, folder, out, budget = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
engine = blipitm.load(ckpt, decode_threads=4, decode_budget_pixels=budget)
engine.embed_images([folder / "warm.png"])

def memory(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

peaks = {}
jobs = {
    "index build": lambda: build_index(engine, folder / "images", out / "index"),
    "eval": lambda: evaluate(
        engine, folder / "ann.json", folder / "images", out / "eval", k_test=4
    ),
}
for name, job in jobs.items():
    engine.cache.clear()
    idle = memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    job()
    peaks[name] = memory("VmHWM") - idle
print(json.dumps(peaks))
"""


def test_index_build_and_eval_stream_images_under_the_engine_budget(
    tiny_ckpt: Path, tmp_path: Path, large_pngs: list[bytes]
) -> None:
    """5 images of 6000x6000, 4 decode threads, a budget of one image: each job's peak RSS rises
    by about one decoded image (144 MB), not by one per thread (and a retained copy each)."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "warm.png").write_bytes(png_bytes((9, 9, 9)))
    for i, png in enumerate(large_pngs[:5]):
        (folder / "images" / f"{i}.png").write_bytes(png)
    captions = [{"image": f"{i}.png", "caption": [f"picture {i}", "a colour"]} for i in range(5)]
    (folder / "ann.json").write_text(json.dumps(captions))
    budget = SIDE * SIDE
    proc = subprocess.run(
        [sys.executable, "-c", _JOBS, str(tiny_ckpt), str(folder), str(tmp_path), str(budget)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    for job, peak in peaks.items():
        assert peak < 4 * budget + 80 * MB, f"{job}: peak RSS rose by {peak / MB:.0f} MB"


# -- long thin images ----------------------------------------------------------------------------


def thin_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of zeros, ``width``x``height``: 155 kB at 1x80,000,000."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    z = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte "None", then the pixels
    rows_per_piece = max(1, (1 << 20) // len(row))
    idat, left = [], height
    while left:
        n = min(left, rows_per_piece)
        idat.append(z.compress(row * n))
        left -= n
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = b"".join(idat)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


_LOAD_ONE = """
import json, sys
from pathlib import Path
from blipitm.errors import InvalidInputError
from blipitm.common.memory import apply_memory_policy
from blipitm.processing import ImageSettings, load_resized
from blipitm.scoring import BLIP

apply_memory_policy()  # as the entry points (CLI, server, filter runner) do

def memory(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

load_resized(sys.argv[1] + ".warm.png", ImageSettings(), BLIP)  # lazy imports, allocator
idle = memory("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
try:
    load_resized(sys.argv[1], ImageSettings(), BLIP, loc=("images", 0))
    outcome = {"scored": True}
except InvalidInputError as e:
    outcome = {"error": type(e).__name__, "field": e.field, "message": str(e)}
outcome["peak"] = memory("VmHWM") - idle
print(json.dumps(outcome))
"""


def _load_in_subprocess(path: Path) -> dict[str, Any]:
    path.with_name(path.name + ".warm.png").write_bytes(png_bytes((9, 9, 9)))
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_ONE, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("size", [(1, 80_000_000), (40_000_000, 1)])
def test_long_thin_pngs_are_refused_before_they_cost_memory(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    """Before: 1x80M (155 kB, under max_pixels) rose to 1.8 GB then MemoryError with a traceback;
    40Mx1 was scored for 1.6 GB. Now both are refused from the header, at no cost."""
    path = tmp_path / "thin.png"
    path.write_bytes(thin_png(*size))
    assert len(path.read_bytes()) < 400_000
    got = _load_in_subprocess(path)
    assert got.get("error") == "ImageTooLargeError", got
    assert got["field"] == "images[0]"
    assert "longer side" in got["message"] and "65535" in got["message"], got["message"]
    assert got["peak"] < 30 * MB, f"peak RSS rose by {got['peak'] / MB:.0f} MB"


def test_the_longest_accepted_side_is_scored_in_bounded_memory(tmp_path: Path) -> None:
    """1x65535, the thinnest image accepted, costs 3 MB (measured); the bound is what a tenth
    of a max_pixels image would cost (4 bytes x 8.9M pixels)."""
    path = tmp_path / "thin.png"
    path.write_bytes(thin_png(1, 65_535))
    got = _load_in_subprocess(path)
    assert got.get("scored"), got
    assert got["peak"] < 34 * MB, f"peak RSS rose by {got['peak'] / MB:.0f} MB"


def test_long_thin_images_are_refused_on_every_path(tiny_ckpt: Path) -> None:
    """The check lives in the one decode path: the engine (API, CLI, filtering, index, eval)
    and the server's loader (413, naming the input) refuse it alike, from the header."""
    thin = thin_png(1, 80_000_000)
    engine = blipitm.load(tiny_ckpt)
    with pytest.raises(ImageTooLargeError, match=r"^images\[1\]: .*longer side") as info:
        engine.embed_images([png_bytes((1, 2, 3)), thin])
    assert info.value.field == "images[1]"
    with ThreadPoolExecutor(2) as pool:
        loader = _loader(pool, engine)
        with pytest.raises(APIError) as api:
            asyncio.run(loader.load(data_uri(thin), ("input", 2)))
    assert (api.value.status, api.value.code, api.value.param) == (
        413,
        "image_too_large",
        "input[2]",
    )
    assert "65535" in api.value.message
    assert engine.decode_budget is not None and engine.decode_budget.in_use == 0
