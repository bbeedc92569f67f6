"""``blipitm eval``: BLIP's Flickr30k / COCO retrieval evaluation (TR/IR R@1/5/10)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blipitm.cli.common import add_model_options, check_positive, load_engine, plural
from blipitm.cli.progress import ConsoleProgress
from blipitm.common.progress import no_progress
from blipitm.evaluation.matrices import DEFAULT_CHUNK_PAIRS, DEFAULT_K_TEST  # torch-free

# What each stage of ``evaluate`` counts.
UNITS = {"images": "image", "texts": "caption", "itm": "pair"}

EPILOG = """\
Expected time: the Karpathy Flickr30k test (1000 images, 5000 captions, k_test 128) scores
about 0.7M image-caption pairs with the ITM head (the union of BLIP's 768k i2t+t2i passes).
With the base model that is ~111 TFLOP of vision encoding plus ~7 GFLOP per pair, about
5 PFLOP: hours on a CPU, minutes on one GPU (--device cuda --dtype bfloat16); measured times
are in BENCHMARKS.md ("Retrieval evaluation").
Use --limit-images for a quick subset. Interrupt at any time: rerunning the same command
resumes from OUT/.work.

--image-root is the folder the annotations' paths are relative to: BLIP's flickr30k_test.json
names "flickr30k-images/1007129816.jpg", so it is the folder that holds flickr30k-images/.

example: blipitm eval --annotations flickr30k_test.json --image-root flickr30k \\
  --output runs/flickr-test --device cuda --dtype bfloat16"""


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Evaluate image-text retrieval as BLIP's train_retrieval.py does: ITC over all "
            "pairs, ITM rerank (itm_logits[1] + cosine) of the top k_test per query, -100 "
            "elsewhere; report TR/IR R@1/5/10 and their means, plus ITC-only recalls. Writes "
            "OUT/results.json and OUT/report.md (with a recall-at-K plot)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--annotations",
        required=True,
        help="Karpathy-split JSON (list of {image, caption}) or a COCO captions JSON",
    )
    p.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    p.add_argument(
        "--k-test",
        type=int,
        default=DEFAULT_K_TEST,
        help="candidates reranked per query (BLIP: 128 Flickr30k, 256 COCO; default 128)",
    )
    p.add_argument("--limit-images", type=int, default=None, help="use only the first N images")
    p.add_argument(
        "--output", default="blipitm-eval", help="output folder (default: ./blipitm-eval)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per vision batch (default: device's)"
    )
    p.add_argument(
        "--chunk-pairs",
        type=int,
        default=DEFAULT_CHUNK_PAIRS,
        help=f"ITM pairs per checkpointed chunk (default {DEFAULT_CHUNK_PAIRS})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_before_loading(args)  # before torch, too: a typo fails in a fraction of a second
    from blipitm.engine import BatchSizes  # torch: not for `--help`
    from blipitm.evaluation import evaluate, load_annotations
    from blipitm.evaluation.report import table

    # A malformed annotation file or a wrong --image-root fails in one line before the model loads.
    dataset = load_annotations(args.annotations, args.image_root, limit_images=args.limit_images)
    engine = load_engine(args)
    if args.batch_size is not None:
        engine.batch_sizes = BatchSizes(images=args.batch_size, texts=engine.batch_sizes.texts)
    progress = ConsoleProgress(units=UNITS)
    try:
        done = evaluate(
            engine,
            args.annotations,
            args.image_root,
            args.output,
            k_test=args.k_test,
            limit_images=args.limit_images,
            image_batch=args.batch_size,
            chunk_pairs=args.chunk_pairs,
            progress=no_progress if args.no_progress else progress,
            dataset=dataset,
        )
    finally:
        progress.close()
    r = done.results
    out = Path(args.output)
    print(table(r))
    print(
        f"{plural(r['pairs']['scored'], 'ITM pair')}, {r['pairs_per_s']:.1f} pairs/s; "
        f"wrote {out / 'results.json'} and {out / 'report.md'}"
    )
    return 0


def _check_before_loading(args: argparse.Namespace) -> None:
    """What fails without the model, checked before it loads (seconds to minutes)."""
    from blipitm.errors import InvalidInputError

    if not Path(args.annotations).is_file():
        what = "is not a file" if Path(args.annotations).exists() else "does not exist"
        raise InvalidInputError(f"{args.annotations} {what}", loc=("annotations",))
    if not Path(args.image_root).is_dir():
        what = "is not a folder" if Path(args.image_root).exists() else "does not exist"
        raise InvalidInputError(f"{args.image_root} {what}", loc=("image_root",))
    check_positive(args.k_test, "k_test")
    check_positive(args.limit_images, "limit_images")
    check_positive(args.batch_size, "batch_size")
    check_positive(args.chunk_pairs, "chunk_pairs")
