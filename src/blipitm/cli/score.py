"""``blipitm score IMAGE TEXT [TEXT ...]``: ITM probability and ITC cosine of one image vs texts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blipitm.cli.common import add_model_options, check_image_file, load_engine


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description="Print the ITM match probability and ITC cosine of IMAGE against each TEXT.",
        epilog='example: blipitm score dog.jpg "a dog on the grass" "a red car" --json',
    )
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="caption(s) to score")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_image_file(args.image)  # before the model: a bad path fails at once
    engine = load_engine(args)
    scores = engine.score(args.image, args.texts)
    if args.json:
        for i, text in enumerate(args.texts):
            row = {
                "text": text,
                "itm_probability": float(scores.itm_probability[i]),
                "itm_logits": [float(x) for x in scores.itm_logits[i]],
                "itc_cosine": float(scores.itc_cosine[i]),
            }
            print(json.dumps(row, ensure_ascii=False))
        return 0
    width = min(60, max(len("text"), *(len(t) for t in args.texts)))
    print(f"{'text':<{width}}  {'ITM prob':>8}  {'ITC cos':>8}")
    for i, text in enumerate(args.texts):
        shown = text if len(text) <= width else text[: width - 1] + "…"
        print(f"{shown:<{width}}  {scores.itm_probability[i]:>8.4f}  {scores.itc_cosine[i]:>8.4f}")
    sys.stdout.flush()
    return 0
