"""Cost of an explanation: one caption's Grad-CAM (``engine.explain``) vs one ``score`` of the same
pair with the image cached, on base-size random weights; and the bf16 maps against fp32.

    python bench/explain_bench.py                        # writes a random base-size checkpoint
    python bench/explain_bench.py --model DIR --reps 10
    python bench/explain_bench.py --model DIR --score-only   # the plain score path alone

Both sides get the same decoded image (a ``ResizedImage``, as the server hands the engine), so
the image's tokens and cross-attention keys/values come from the cache on both; ``score`` computes
the ITM and ITC passes of one caption, ``explain`` the same plus the backward pass of the text
layers from the explained one on. Speed is never asserted in tests; this prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTION = "a young man riding a red bike on the street near a small park with trees"
MAP_CAPTIONS = [
    CAPTION,
    "two dogs playing with a ball on the grass",
    "a woman in a white dress standing next to a car",
]


def photo(seed: int = 0) -> bytes:
    """A 640x480 JPEG of smooth random content."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm
    return statistics.median(_time(fn) for _ in range(reps))


def paired(
    a: Callable[[], object], b: Callable[[], object], reps: int
) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` and the median of their per-round ratio ``b / a``, timed
    alternately so that both see the same load on a shared machine."""
    a(), b()  # warm
    rounds = [(_time(a), _time(b)) for _ in range(reps)]
    return (
        statistics.median(x for x, _ in rounds),
        statistics.median(y for _, y in rounds),
        statistics.median(y / x for x, y in rounds),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: random base-size)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--score-only", action="store_true", help="only the plain score path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import blipitm
    from blipitm.processing import ResizedImage

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from blipitm.testing.make_checkpoint import make_checkpoint

            model = make_checkpoint(Path(tmp) / "base", preset="base", seed=7)
        fp32 = blipitm.load(model)
        image = ResizedImage.load(photo(), fp32.image_settings, fp32.protocol)
        captions = [f"{CAPTION} {i}" for i in range(32)]
        rows: list[tuple[str, str]] = []
        score_one = lambda: fp32.score(image, CAPTION)  # noqa: E731
        one = median_s(score_one, args.reps)
        many = median_s(lambda: fp32.score(image, captions), max(3, args.reps // 3))
        rows.append(("score, 1 caption, image cached (fp32)", f"{one * 1000:.1f} ms"))
        throughput = f"{len(captions) / many:.1f} pairs/s"
        rows.append(("score, 32 captions, image cached (fp32)", throughput))
        if not args.score_only:
            one, explain, ratio = paired(score_one, lambda: fp32.explain(image, CAPTION), args.reps)
            layer = fp32.explain(image, CAPTION).layer
            rows.append(
                (
                    f"explain / score, 1 caption, image cached, layer {layer} (fp32)",
                    f"{explain * 1000:.1f} ms / {one * 1000:.1f} ms: {ratio:.2f}x (target <= 3x)",
                )
            )
            layers = fp32.config.text.num_hidden_layers
            _, _, early = paired(
                score_one, lambda: fp32.explain(image, CAPTION, layer=0), args.reps
            )
            case = f"explain / score at layer 0 (backward through all {layers} layers)"
            rows.append((case, f"{early:.2f}x"))
            bf16 = blipitm.load(model, dtype="bfloat16")
            bf16_image = ResizedImage.load(photo(), bf16.image_settings, bf16.protocol)
            worst_map = worst_token = 0.0
            for a, b in zip(
                fp32.explain_batch(image, MAP_CAPTIONS),
                bf16.explain_batch(bf16_image, MAP_CAPTIONS),
                strict=True,
            ):
                worst_map = max(worst_map, float(np.abs(a.map - b.map).max() / a.map.max()))
                worst_token = max(
                    worst_token,
                    float(np.abs(a.token_maps - b.token_maps).max() / a.token_maps.max()),
                )
            rows.append(
                (
                    f"bf16 vs fp32 maps, layer {layer} (compute {bf16.info.compute_dtype})",
                    f"map {worst_map:.3f}, token maps {worst_token:.3f} of the fp32 max",
                )
            )
            bf16_one, bf16_explain, bf16_ratio = paired(
                lambda: bf16.score(bf16_image, CAPTION),
                lambda: bf16.explain(bf16_image, CAPTION),
                args.reps,
            )
            rows.append(
                (
                    "explain / score (bf16)",
                    f"{bf16_explain * 1000:.1f} ms / {bf16_one * 1000:.1f} ms: {bf16_ratio:.2f}x",
                )
            )
    print(
        f"- machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print()
    print("| case | measured |")
    print("|---|---|")
    for case, value in rows:
        print(f"| {case} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
