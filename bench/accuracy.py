"""Reduced-precision dtypes against float32 on the same weights: the table in BENCHMARKS.md.

    python bench/accuracy.py                      # random base-size weights (bench/out/base-random)
    python bench/accuracy.py --model DIR --dtypes int8 bfloat16

For 16 images x 128 captions (``score_matrix``): the largest |difference| of the ITM probability
and of the ITC cosine, and how often the 128-caption ranking of each image (BLIP's ranking score,
``itm_logit[1] + cosine``) keeps its top-1 caption and its top-5 set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import blipitm
from run import ROOT, captions, jpeg_images


def compare(want: blipitm.MatrixScores, got: blipitm.MatrixScores) -> dict[str, float]:
    def rank_score(s: blipitm.MatrixScores) -> np.ndarray:
        return s.itm_logits[..., 1] + s.itc_cosine  # [I, T]

    a, b = np.argsort(-rank_score(want), axis=1), np.argsort(-rank_score(got), axis=1)
    top5 = [len(set(x[:5]) & set(y[:5])) / 5 for x, y in zip(a, b, strict=True)]
    return {
        "d_prob": float(np.abs(got.itm_probability - want.itm_probability).max()),
        "d_cos": float(np.abs(got.itc_cosine - want.itc_cosine).max()),
        "top1": float((a[:, 0] == b[:, 0]).mean()),
        "top5": float(np.mean(top5)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "bench" / "out" / "base-random")
    p.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--captions", type=int, default=128)
    args = p.parse_args()
    if not (args.model / "config.json").exists():
        from blipitm.testing.make_checkpoint import make_checkpoint

        make_checkpoint(args.model, preset="base", seed=0)
    images, texts = jpeg_images(args.images, 3), captions(args.captions, 4)
    want = blipitm.load(args.model).score_matrix(images, texts)
    print(
        f"| dtype (compute) | max abs d itm_probability | max abs d itc_cosine | top-1 agreement "
        f"| top-5 agreement |  ({args.images} images x {args.captions} captions vs float32)"
    )
    print("|---|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        engine = blipitm.load(args.model, dtype=dtype)
        r = compare(want, engine.score_matrix(images, texts))
        print(
            f"| {dtype} ({engine.info.compute_dtype}) | {r['d_prob']:.4f} | {r['d_cos']:.4f} "
            f"| {r['top1']:.1%} | {r['top5']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
