"""``blipitm search INDEX "text"`` / ``blipitm search INDEX --image PATH``: two-stage retrieval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from blipitm.cli.common import add_model_options, check_image_file, check_positive, load_engine
from blipitm.errors import InvalidInputError


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Text -> images (a caption) or image -> captions (--image): exact ITC top-k over "
            "the whole index, then ITM rerank of the best --rerank-k with the BLIP score "
            "(itm_logits[1] + cosine; the ITM probability under --protocol transformers)."
        ),
        epilog='example: blipitm search photos.index "a dog on the grass" --top-k 5 --json',
    )
    p.add_argument("index", metavar="INDEX")
    p.add_argument("query", nargs="?", help="caption to search images with")
    p.add_argument("--image", help="image file to search captions with")
    p.add_argument("--top-k", type=int, default=10, help="results to show (default 10)")
    p.add_argument(
        "--rerank-k",
        type=int,
        default=128,
        help="ITC candidates rescored with ITM (default 128; 0: ITC only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    add_model_options(p, from_index=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index, modality_problem, search  # torch: not for `--help`

    if (args.query is None) == (args.image is None):  # a usage error: exit 2, like argparse's
        raise InvalidInputError("give either a caption or --image PATH", loc=("query",))
    # Everything that fails without the model fails before it loads.
    check_positive(args.top_k, "top_k")
    check_positive(args.rerank_k, "rerank_k", minimum=0)
    if args.image is not None:
        check_image_file(args.image)
    with Index.open(args.index) as opened:  # missing or damaged: one line, exit 2
        problem = modality_problem(opened, text_query=args.image is None)
        manifest = opened.manifest
    if problem is not None:  # e.g. --image on an index of images: say so, exit 2
        raise InvalidInputError(f"{args.index}: {problem}", loc=("query",))
    engine = load_engine(args, manifest=manifest)
    query: Any = args.query if args.image is None else Path(args.image)
    with Index.open(args.index, engine) as index:
        hits = search(engine, index, query, top_k=args.top_k, rerank_k=args.rerank_k)
    if args.json:
        for rank, hit in enumerate(hits, start=1):
            print(json.dumps({"rank": rank, **hit.as_dict()}, ensure_ascii=False))
        return 0
    if not hits:  # only if every item went between the check above and the search
        print("no results")
        return 0
    print(f"{'#':>3}  {'score':>8}  {'ITM prob':>8}  {'ITC cos':>8}  {'id':>6}  item")
    for rank, h in enumerate(hits, start=1):
        prob = "-" if h.itm_probability is None else f"{h.itm_probability:.4f}"
        shown = h.path if h.kind == "image" else h.text  # folder name + path inside it
        print(f"{rank:>3}  {h.score:>8.4f}  {prob:>8}  {h.itc_cosine:>8.4f}  {h.id:>6}  {shown}")
    return 0
