"""``blipitm filter INPUT... --out DIR``: score an image–caption dataset and keep the matches."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from blipitm.cli.common import add_model_options, load_engine

LOG_EVERY_S = 10.0


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Score every (image, caption) pair of WebDataset shards or Parquet/JSONL/CSV tables "
            "and keep those above a threshold or the best fraction. Resumable: run it again with "
            "the same arguments after an interruption. See docs/filtering.md."
        ),
        epilog="example: blipitm filter 'shards/{00000..00009}.tar' --out filtered --threshold 0.5",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="shards/tables; globs and {000..009}")
    p.add_argument("--out", required=True, help="output folder (also what a resumed run reads)")
    p.add_argument(
        "--by",
        choices=("itm", "itc", "blip"),
        default="itm",
        help="score to filter on: ITM probability, ITC cosine, or BLIP's match logit + cosine "
        "(default: itm)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="keep pairs scoring at least this")
    how.add_argument(
        "--keep-fraction", type=float, help="keep the best ceil(F*N) of the N scored pairs"
    )
    p.add_argument(
        "--write",
        choices=("scores", "kept", "both"),
        default="both",
        help="scores: only scores/*.parquet; kept: also the kept samples (default: both)",
    )
    p.add_argument("--image-col", help="table column (or tar extension) holding the image")
    p.add_argument("--caption-col", help="table column (or KEY.json field) holding the caption(s)")
    p.add_argument("--id-col", help="table column holding the sample id (default: key, id)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per engine call")
    p.add_argument("--restart", action="store_true", help="discard DIR's earlier results first")
    add_model_options(p)
    p.set_defaults(run=run)


class _Printer:
    """One progress line per LOG_EVERY_S: samples, samples/s and an ETA from the shards left."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            return
        self.last = now
        rate = p.samples / max(p.elapsed_s, 1e-9)
        eta = ""
        if p.shards_this_run:
            left = p.shards - p.shards_done
            eta = f", ETA {p.elapsed_s / p.shards_this_run * left:.0f} s"
        print(
            f"filter: shard {p.shard + 1}/{p.shards} ({p.shards_done} done), {p.samples} samples, "
            f"{rate:.1f} samples/s{eta}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from blipitm.filtering import filter_dataset

    engine = load_engine(args)
    stats = filter_dataset(
        args.inputs,
        args.out,
        engine=engine,
        by=args.by,
        threshold=args.threshold,
        keep_fraction=args.keep_fraction,
        write=args.write,
        image_col=args.image_col,
        caption_col=args.caption_col,
        id_col=args.id_col,
        batch_size=args.batch_size,
        restart=args.restart,
        progress=_Printer(),
    )
    for err in stats["shard_errors"]:
        print(f"blipitm: error: shard {err['shard']}: {err['error']}", file=sys.stderr)
    bad = {k: v for k, v in stats["status_pairs"].items() if k != "ok"}
    print(
        f"{stats['samples']} samples, {stats['pairs']} pairs, {stats['scored_pairs']} scored, "
        f"kept {stats['kept_pairs']} pairs of {stats['kept_samples']} samples "
        f"({stats['score_column']} >= {stats['threshold']})"
        + (f"; unscored: {bad}" if bad else "")
        + f"; see {args.out}/stats.json"
    )
    return 1 if stats["shard_errors"] else 0
