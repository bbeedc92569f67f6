"""``blipitm explain IMAGE TEXT [TEXT ...]``: scores and Grad-CAM overlays of captions."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from blipitm.cli.common import add_model_options, check_image_file, check_positive, load_engine
from blipitm.errors import InvalidInputError

MAX_SIDE = 1024  # overlays are drawn over the image scaled to at most this (the blur is O(side^2))


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description="Print the ITM probability and ITC cosine of IMAGE against each TEXT and "
        "write one PNG per caption: its Grad-CAM map (LAVIS's, on one cross-attention layer) "
        "drawn over the image.",
        epilog='example: blipitm explain dog.jpg "a dog on the grass" "a red car" --per-token',
    )
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="caption(s) to explain")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="text-encoder layer, 0-based (default: 6 as LAVIS, or the second to last layer of a "
        "shallower model)",
    )
    p.add_argument(
        "--out",
        default="explanations",
        metavar="DIR",
        help="folder for the PNGs (default: %(default)s)",
    )
    p.add_argument(
        "--per-token",
        action="store_true",
        help="also write a grid of every token's map, titled with its word",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    add_model_options(p)
    p.set_defaults(run=run)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "caption"


def _display_image(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except OSError as e:
        raise InvalidInputError(f"cannot read image file {path}: {e}", loc=("image",)) from None
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def run(args: argparse.Namespace) -> int:
    from blipitm.explain import token_grid

    check_image_file(args.image)  # before the model: a bad path fails at once
    check_positive(args.layer, "layer", minimum=0)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InvalidInputError(f"{args.out} exists and is not a folder", loc=("out",))
    engine = load_engine(args)
    explanations = engine.explain_batch(args.image, args.texts, layer=args.layer)
    display = _display_image(args.image)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    width = min(60, max(len("text"), *(len(t) for t in args.texts)))
    if not args.json:
        print(f"layer {explanations[0].layer}; overlays in {out}/")
        print(f"{'text':<{width}}  {'ITM prob':>8}  {'ITC cos':>8}  overlay")
    for i, e in enumerate(explanations):
        stem = f"{i:02d}-{_slug(e.text)}"
        path = out / f"{stem}.png"
        e.overlay(image=display).save(path)
        row: dict[str, Any] = {
            "text": e.text,
            "itm_probability": e.itm_probability,
            "itm_logits": [float(x) for x in e.itm_logits],
            "itc_cosine": e.itc_cosine,
            "layer": e.layer,
            "tokens": e.tokens,
            "overlay": str(path),
        }
        if args.per_token:
            grid_path = out / f"{stem}-tokens.png"
            token_grid(display, list(e.token_maps), e.tokens).save(grid_path)
            row["token_grid"] = str(grid_path)
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            shown = e.text if len(e.text) <= width else e.text[: width - 1] + "…"
            print(f"{shown:<{width}}  {e.itm_probability:>8.4f}  {e.itc_cosine:>8.4f}  {path}")
    return 0
