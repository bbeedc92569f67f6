"""Throughput on one device, for ``bench/gpu.sh``: vision (eager and compiled), ITM, two models on
one device, a Batch API job, the captioner, ``filter --capfilt``, and a Flickr30k-sized evaluation.

    python bench/gpu_bench.py --device cuda --preset base --dtype bfloat16 --out gpu.md
    python bench/gpu_bench.py --device cpu --preset tiny --eval-images 8 --eval-captions 40 --k 4

Random weights of the preset and synthetic inputs (384x384 RGB arrays: decoding is not what is
measured), so it needs nothing but the package. The evaluation is BLIP's retrieval protocol
through ``blipitm.evaluation.compute_scores`` (ITC for all pairs, ITM for each query's top k),
1000 images x 5000 captions with k=128 by default, timed end to end. Prints and writes a
Markdown table for BENCHMARKS.md. ``--no-compile`` skips the compiled vision rows (the dry run:
inductor's compile alone would take most of its budget on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blipitm
from blipitm.evaluation.matrices import compute_scores
from blipitm.filtering import CapFilt, LocalRun, Threshold, filter_dataset
from blipitm.testing.make_checkpoint import make_checkpoint
from filter_bench import write_shards
from run import captions, jpeg_images


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


def compiled_vision(engine: blipitm.Engine, images: list, device: str, mode: str | None) -> str:
    """Images/s of the vision tower with each layer under ``torch.compile`` (``mode``:
    inductor's default, or ``reduce-overhead``: CUDA graphs), and the compile time; the layers
    are put back as they were after."""
    layers = engine.model.vision_model.encoder.layers
    eager = [layer.forward for layer in layers]
    try:
        for layer in layers:
            layer.forward = torch.compile(layer.forward, mode=mode, dynamic=False)
        sync(device)
        t = time.perf_counter()
        engine.embed_images(images)  # compiles (every batch shape of this call)
        sync(device)
        compile_s = time.perf_counter() - t
        seconds = timed(lambda: engine.embed_images(images), device)
    finally:
        for layer, forward in zip(layers, eager, strict=True):
            layer.forward = forward
    return f"{len(images) / seconds:.1f} images/s (first call, compiling: {compile_s:.1f} s)"


def two_models(engine: blipitm.Engine, other: blipitm.Engine, images: list, texts: list[str],
               device: str) -> str:  # fmt: skip
    """Pairs/s of two models on one device hit alternately, against one of them alone."""

    def alternate() -> None:
        for image in images:
            engine.score(image, texts, itc=False)
            other.score(image, texts, itc=False)

    def alone() -> None:
        for image in images:
            engine.score(image, texts, itc=False)

    pairs = len(images) * len(texts)
    both, one = timed(alternate, device), timed(alone, device)
    return f"{2 * pairs / both:.0f} pairs/s alternating, {pairs / one:.0f} pairs/s one model alone"


def batch_job(ckpt: Path, tmp: Path, texts: list[str], args: argparse.Namespace) -> str:
    """Lines/s of ``blipitm batch run`` (embeddings lines of 8 texts), model load included."""
    source, out = tmp / "batch-in.jsonl", tmp / "batch-out.jsonl"
    lines = []
    for i in range(0, len(texts), 8):
        body = {"input": texts[i : i + 8]}
        lines.append({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                      "body": body})  # fmt: skip
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [sys.executable, "-m", "blipitm.cli.main", "batch", "run", str(source),
            "--output", str(out), "--model", str(ckpt), "--device", args.device,
            "--dtype", args.dtype]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=240, env=os.environ)
    seconds = time.perf_counter() - t
    answered = sum(1 for _ in out.open())
    assert answered == len(lines), f"{answered} of {len(lines)} lines answered"
    return f"{len(lines) / seconds:.1f} lines/s ({len(lines)} lines, process start included)"


def captioner_rows(cap: blipitm.Captioner, images: list, device: str) -> list[str]:
    rows = []
    for beams in (1, 3):
        seconds = timed(lambda beams=beams: cap.caption(images, num_beams=beams), device)
        rows.append(f"| captioner, {len(images)} images, {'greedy' if beams == 1 else 'beam-3'} "
                    f"| {len(images) / seconds:.1f} captions/s |")  # fmt: skip
    return rows


def capfilt_row(engine: blipitm.Engine, cap: blipitm.Captioner, tmp: Path, n: int) -> str:
    """Samples/s of filtering WebDataset shards with one synthetic caption per image."""
    images = jpeg_images(n, 4)
    paths = write_shards(tmp / "capfilt-in", images, [captions(1, 50 + i) for i in range(n)], 32)
    t = time.perf_counter()
    stats = filter_dataset(paths, tmp / "capfilt-out", Threshold(0.5), model=engine,
                           run=LocalRun(32), capfilt=CapFilt(cap, synthetic=1))  # fmt: skip
    seconds = time.perf_counter() - t
    return f"| filter --capfilt (K=1), {n} JPEG samples | {stats.samples / seconds:.1f} samples/s |"


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
    p.add_argument("--caption-images", type=int, default=64)
    p.add_argument("--capfilt-samples", type=int, default=256)
    p.add_argument("--batch-texts", type=int, default=4096)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled vision rows")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    ckpt = make_checkpoint(tmp / "ckpt", preset=args.preset, seed=0, text_heads=12)
    load = {"device": args.device, "dtype": args.dtype, "cache_bytes": 0}
    engine = blipitm.load(ckpt, **load)
    size = engine.config.vision.image_size
    vis_images, _ = synthetic(args.vision_images, 0, size, 1)
    t_vis = timed(lambda: engine.embed_images(vis_images), args.device)
    _, itm_captions = synthetic(0, args.itm_captions, size, 2)
    t_itm = timed(lambda: engine.score(vis_images[0], itm_captions, itc=False), args.device)
    extra = []
    if args.no_compile:
        extra.append("| vision, compiled | skipped (--no-compile) |")
    else:
        modes = [None, "reduce-overhead"] if args.device.startswith("cuda") else [None]
        for mode in modes:
            try:  # one GPU session: a failing compile must not lose the other rows
                result = compiled_vision(engine, vis_images, args.device, mode)
            except Exception as e:
                result = f"failed: {type(e).__name__}: {str(e)[:200]}"
            extra.append(f"| vision, {args.vision_images} images, torch.compile "
                         f"{mode or 'default'} | {result} |")  # fmt: skip
    other = blipitm.load(make_checkpoint(tmp / "other", preset=args.preset, seed=1), **load)
    two = two_models(engine, other, vis_images[:4], itm_captions[:256], args.device)
    extra.append(f"| two models on one device, 4 images x 256 captions each | {two} |")
    del other
    _, batch_texts = synthetic(0, args.batch_texts, size, 4)
    extra.append(f"| Batch API job (`blipitm batch run`), /v1/embeddings "
                 f"| {batch_job(ckpt, tmp, batch_texts, args)} |")  # fmt: skip
    cap = blipitm.load_captioner(
        make_checkpoint(tmp / "cap", preset=args.preset, seed=2, task="caption"), **load
    )
    extra += captioner_rows(cap, vis_images[: args.caption_images], args.device)
    extra.append(capfilt_row(engine, cap, tmp, args.capfilt_samples))
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
        *extra,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    tmp_dir.cleanup()


if __name__ == "__main__":
    main()
