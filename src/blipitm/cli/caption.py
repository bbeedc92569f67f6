"""``blipitm caption IMAGE...``: BLIP's captions for images (beam search, greedy or sampling)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from blipitm.cli.common import add_model_options, check_image_file, check_positive, load_captioner
from blipitm.engine.options import DEFAULT_CAPTION_MODEL, LoadOptions
from blipitm.errors import InvalidInputError

# Here rather than imported from engine/captioner.py, which imports torch; a test holds them equal.
NUM_BEAMS = 3
NEW_TOKENS = 20
TOP_P = 0.9
TEMPERATURE = 1.0


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Write a caption for each IMAGE with BLIP's captioner (a BlipForConditionalGeneration "
            f"checkpoint, default {DEFAULT_CAPTION_MODEL}). Lengths count the prompt's tokens "
            "('a picture of ' is 4), as transformers counts them."
        ),
        epilog="example: blipitm caption dog.jpg cat.png --num-beams 3 --json",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    g = p.add_argument_group("generation")
    g.add_argument(
        "--num-beams",
        type=int,
        default=None,
        help=f"beam search width; 1: greedy search (default: {NUM_BEAMS}; with --sample: 1)",
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"most tokens, prompt included (default: the prompt's plus {NEW_TOKENS})",
    )
    g.add_argument("--min-length", type=int, default=0, help="fewest tokens, prompt included")
    g.add_argument("--sample", action="store_true", help="nucleus sampling instead of search")
    g.add_argument("--top-p", type=float, default=TOP_P, help="nucleus mass when sampling")
    g.add_argument(
        "--temperature",
        type=float,
        default=TEMPERATURE,
        help=f"divides the scores before top-k and top-p when sampling (default: {TEMPERATURE})",
    )
    g.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="CTRL repetition penalty (default: 1.0; with --sample: 1.1, as BLIP's CapFilt)",
    )
    g.add_argument(
        "--num-captions", type=int, default=1, help="captions per image (best beams, or samples)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line per image")
    add_model_options(p, preset=LoadOptions(source=DEFAULT_CAPTION_MODEL), model_env=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Before the model: a bad path or number fails at once.
    for i, path in enumerate(args.images):
        check_image_file(path, loc=("images", i))
    check_positive(args.num_beams, "--num-beams")
    check_positive(args.num_captions, "--num-captions")
    check_positive(args.max_length, "--max-length")
    check_positive(args.min_length, "--min-length", minimum=0)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise InvalidInputError(
            f"must be a finite number > 0, got {args.temperature}", loc=("--temperature",)
        )
    captioner = load_captioner(args, default_model=DEFAULT_CAPTION_MODEL)
    results = captioner.caption(
        args.images,
        num_beams=args.num_beams,
        max_length=args.max_length,
        min_length=args.min_length,
        sample=args.sample,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        num_captions=args.num_captions,
    )
    for path, result in zip(args.images, results, strict=True):
        if args.json:
            line = {
                "image": path,
                "captions": result.captions,
                "finish_reasons": result.finish_reasons,
            }
            print(json.dumps(line, ensure_ascii=False))
        else:
            for caption in result.captions:
                print(f"{path}\t{caption}")
    sys.stdout.flush()
    return 0
