"""``blipitm filter INPUT... --out DIR``: score an image–caption dataset and keep the matches."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TextIO

from blipitm.cli.common import (
    add_cache_mb_alias,
    add_model_options,
    add_ray_options,
    check_positive,
    model_values,
)
from blipitm.cli.progress import ConsoleProgress
from blipitm.engine.options import FILTERING_PRESET, options_from
from blipitm.errors import CheckpointError, InvalidInputError
from blipitm.filtering.capfilt import DEFAULT_TOP_P, CapFilt
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
    c = p.add_argument_group("CapFilt: bootstrap with synthetic captions (docs/capfilt.md)")
    c.add_argument(
        "--capfilt",
        action="store_true",
        help="score each image's captions together with synthetic ones from --captioner, and "
        "keep those that pass, as BLIP's CapFilt built its training data",
    )
    c.add_argument(
        "--captioner",
        metavar="MODEL",
        help="the captioner (hub id, local directory or BLIP .pth), e.g. "
        "Salesforce/blip-image-captioning-base; required with --capfilt",
    )
    c.add_argument("--synthetic", type=int, metavar="K", help="synthetic captions per image (1)")
    c.add_argument("--top-p", type=float, help=f"nucleus sampling mass ({DEFAULT_TOP_P})")
    c.add_argument(
        "--seed",
        type=int,
        help="seed of the sampling (0); each sample's own stream is derived "
        "from it, its shard and its key",
    )
    c.add_argument(
        "--caption-max-length",
        type=int,
        metavar="L",
        help="most tokens of a synthetic caption, prompt included (the prompt's plus 20)",
    )
    c.add_argument(
        "--caption-min-length", type=int, metavar="L", help="fewest tokens, prompt included (0)"
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

    values = model_values(args)
    options = options_from(values, base=FILTERING_PRESET)
    capfilt = _capfilt(args, values)  # before any model loads: a bad flag fails at once
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
            capfilt=capfilt,
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
    if stats.sources is not None:
        print(
            "kept captions: "
            + ", ".join(
                f"{c['kept']} of {c['pairs']} {source}" for source, c in stats.sources.items()
            )
        )
    return 1 if stats.shard_errors else 0


# The CapFilt flags but --capfilt itself: meaningless without it.
_CAPFILT_FLAGS = {
    "captioner": "--captioner",
    "synthetic": "--synthetic",
    "top_p": "--top-p",
    "seed": "--seed",
    "caption_max_length": "--caption-max-length",
    "caption_min_length": "--caption-min-length",
}


def _capfilt(args: argparse.Namespace, values: dict[str, Any]) -> CapFilt | None:
    """The CapFilt settings the flags give (None without --capfilt); every bad value, and a
    --captioner that is no captioner, is refused naming its flag, before a model loads."""
    if not args.capfilt:
        given = [flag for dest, flag in _CAPFILT_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise InvalidInputError("only means something with --capfilt", loc=(given[0],))
        return None
    if args.captioner is None:
        raise InvalidInputError(
            "--capfilt needs the captioner that writes the synthetic captions, e.g. "
            "--captioner Salesforce/blip-image-captioning-base (or a local captioner checkpoint)",
            loc=("--captioner",),
        )
    check_positive(args.synthetic, "--synthetic")
    check_positive(args.caption_max_length, "--caption-max-length")
    check_positive(args.caption_min_length, "--caption-min-length", minimum=0)
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise InvalidInputError(f"must be in (0, 1], got {args.top_p}", loc=("--top-p",))
    _check_captioner(args.captioner)
    # The model flags (--device, --dtype, --protocol, the limits) apply to both models.
    captioner = options_from(
        {**values, "model": args.captioner, "revision": None, "tokenizer": None},
        base=FILTERING_PRESET,
    )
    return CapFilt(
        captioner,
        synthetic=1 if args.synthetic is None else args.synthetic,
        seed=0 if args.seed is None else args.seed,
        top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p,
        max_length=args.caption_max_length,
        min_length=args.caption_min_length or 0,
    )


def _check_captioner(source: str) -> None:
    """A --captioner that names no captioner checkpoint (an ITM model, a missing path),
    refused from its config alone, before any weights are read."""
    from blipitm.checkpoint import resolve  # torch: only once the command runs

    try:
        resolve(source).require("caption")
    except CheckpointError as e:
        raise InvalidInputError(str(e), loc=("--captioner",)) from None


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
