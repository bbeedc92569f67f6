"""Throughput on one device, for ``bench/gpu.sh``: vision, ITM, and a Flickr30k-sized evaluation.

    python bench/gpu_bench.py --device cuda --preset base --dtype bfloat16 --out gpu.md
    python bench/gpu_bench.py --device cpu --preset tiny --eval-images 8 --eval-captions 40 --k 4

Random weights of the preset and synthetic inputs (384x384 RGB arrays: decoding is not what is
measured), so it needs nothing but the package. The evaluation is BLIP's retrieval protocol
through ``blipitm.evaluation.compute_scores`` (ITC for all pairs, ITM for each query's top k),
1000 images x 5000 captions with k=128 by default, timed end to end. Prints and writes a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blipitm
from blipitm.evaluation.matrices import compute_scores
from blipitm.testing.make_checkpoint import make_checkpoint
from run import captions


def synthetic(n_images: int, n_captions: int, size: int, seed: int) -> tuple[list, list[str]]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_images)]
    return images, captions(n_captions, seed)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: kernels, autotuning, allocator
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="base", choices=("tiny", "base", "large"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--vision-images", type=int, default=512)
    p.add_argument("--itm-captions", type=int, default=2048)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--eval-captions", type=int, default=5000)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", preset=args.preset, seed=0, text_heads=12)
        engine = blipitm.load(ckpt, device=args.device, dtype=args.dtype, cache_bytes=0)
    size = engine.config.vision.image_size
    vis_images, _ = synthetic(args.vision_images, 0, size, 1)
    t_vis = timed(lambda: engine.embed_images(vis_images), args.device)
    _, itm_captions = synthetic(0, args.itm_captions, size, 2)
    t_itm = timed(lambda: engine.score(vis_images[0], itm_captions, itc=False), args.device)
    eval_images, eval_captions = synthetic(args.eval_images, args.eval_captions, size, 3)
    sync(args.device)
    t0 = time.perf_counter()
    scores = compute_scores(engine, eval_images, eval_captions, k_test=args.k)
    sync(args.device)
    t_eval = time.perf_counter() - t0

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    info = engine.info
    lines = [
        f"Device: {name} ({args.device}); torch {torch.__version__}; blipitm "
        f"{blipitm.__version__}; {args.preset} random weights, dtype {info.dtype} (compute "
        f"{info.compute_dtype}).",
        "",
        "| case | result |",
        "|---|---|",
        f"| vision, {args.vision_images} images | {args.vision_images / t_vis:.1f} images/s |",
        f"| ITM, 1 image x {args.itm_captions} captions "
        f"| {args.itm_captions / t_itm:.0f} pairs/s |",
        f"| evaluation, {args.eval_images} images x {args.eval_captions} captions, k={args.k} "
        f"| {t_eval:.2f} s ({scores.pairs_scored} ITM pairs, "
        f"{scores.pairs_per_second:.0f} pairs/s in the ITM stage) |",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
