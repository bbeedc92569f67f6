"""``blipitm filter INPUT... --out DIR``: score an image–caption dataset and keep the matches."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TextIO

from blipitm.cli.common import (
    add_cache_mb_alias,
    add_model_options,
    add_ray_options,
    model_values,
)
from blipitm.cli.progress import ConsoleProgress
from blipitm.engine.options import FILTERING_PRESET, options_from
from blipitm.filtering.formats import described
from blipitm.filtering.policy import KeepFraction, KeepPolicy, Threshold
from blipitm.filtering.readers import Columns
from blipitm.filtering.runner import WRITES
from blipitm.filtering.runs import LocalRun, RayRun, Run
from blipitm.filtering.scoring import By

if TYPE_CHECKING:
    from blipitm.filtering import FilterProgress

MIB = 1 << 20


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            f"Score every (image, caption) pair of a dataset ({described()}) and keep those "
            "above a threshold or the best fraction. Resumable: run it again with the same "
            "arguments after an interruption. See docs/filtering.md."
        ),
        epilog="example: blipitm filter 'shards/{00000..00009}.tar' --out filtered --threshold 0.5",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="shards/tables; globs and {000..009}")
    p.add_argument("--out", required=True, help="output folder (also what a resumed run reads)")
    p.add_argument(
        "--by",
        choices=[b.value for b in By],
        default=By.ITM.value,
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
        choices=WRITES,
        default="both",
        help="scores: only scores/*.parquet; kept: also the kept samples (default: both)",
    )
    p.add_argument("--image-col", help="table column (or tar extension) holding the image")
    p.add_argument("--caption-col", help="table column (or KEY.json field) holding the caption(s)")
    p.add_argument("--id-col", help="table column holding the sample id (default: key, id)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per engine call")
    add_cache_mb_alias(p)
    p.add_argument("--restart", action="store_true", help="discard DIR's earlier results first")
    add_ray_options(
        p, doc="docs/filtering.md#ray", does="score on Ray Data", actors="scoring actors"
    )
    # --cache-bytes: an image repeated in a later batch is not encoded again (within a batch it
    # never is); the filter's default is smaller than the library's (docs/filtering.md).
    add_model_options(p, preset=FILTERING_PRESET)
    p.set_defaults(run=run)


class _Printer:
    """The filter's per-batch records as calls of the one progress protocol, rendered by the one
    console renderer: samples scored of those expected (an estimate until a shard finishes),
    with pairs and shards as the note. Call :meth:`close` at the end."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.console = ConsoleProgress(stream, bars=bar, units={"filter": "sample"})

    def __call__(self, p: FilterProgress) -> None:
        note = f"{p.pairs} pairs; shards {p.shards_done}/{p.shards} done"
        self.console("filter", p.samples, p.samples_expected, note=note)

    def close(self) -> None:
        self.console.close()


def run(args: argparse.Namespace) -> int:
    from blipitm.filtering import filter_dataset

    options = options_from(model_values(args), base=FILTERING_PRESET)
    printer = _Printer()
    try:
        stats = filter_dataset(
            args.inputs,
            args.out,
            _keep_policy(args),
            model=options,
            columns=Columns(args.image_col, args.caption_col, args.id_col),
            run=_run_kind(args),
            write=args.write,
            restart=args.restart,
            progress=printer,
        )
    finally:
        printer.close()
    for err in stats.shard_errors:
        print(f"blipitm: error: shard {err['shard']}: {err['error']}", file=sys.stderr)
    bad = {k: v for k, v in stats.status_pairs.items() if k != "ok"}
    print(
        f"{stats.samples} samples, {stats.pairs} pairs, {stats.scored_pairs} scored, "
        f"kept {stats.kept_pairs} pairs of {stats.kept_samples} samples "
        f"({stats.score_column} >= {stats.threshold})"
        + (f"; unscored: {bad}" if bad else "")
        + f"; see {args.out}/stats.json"
    )
    return 1 if stats.shard_errors else 0


def _keep_policy(args: argparse.Namespace) -> KeepPolicy:
    if args.threshold is not None:
        return Threshold(args.threshold, by=args.by)
    return KeepFraction(args.keep_fraction, by=args.by)


def _run_kind(args: argparse.Namespace) -> Run:
    if args.ray is None:
        return LocalRun(args.batch_size)
    return RayRun(
        args.ray,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
    )
