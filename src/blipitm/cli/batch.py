"""``blipitm batch run``: a Batch API input file answered offline, without a server.

The same lines as ``POST /v1/batches`` (OpenAI's ``{"custom_id", "method", "url", "body"}``), the
same answers (each line goes through the server's app, in process, unmetered), written to
``--output`` (and the failed ones to ``--errors``, or to the output too). Run again, it resumes:
the lines already answered in the output files are not redone. With ``--ray`` the lines are
answered by a pool of Ray actors, in chunks, into the same files (docs/batch.md, "On Ray").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipitm.cli.common import add_model_options, add_ray_options, check_positive, model_values
from blipitm.common.ray_cluster import RayPool
from blipitm.engine.options import SERVER_PRESET, LoadOptions, options_from
from blipitm.errors import InvalidInputError

if TYPE_CHECKING:
    from blipitm.server.batch.lines import Line
    from blipitm.server.batch.runner import Answers
    from blipitm.server.batch.store import Batch

log = logging.getLogger("blipitm")

# With --ray, lines per task: large enough that a task's overhead (a few ms) is small against
# its lines' work, small enough that an interrupt redoes little and progress moves often.
DEFAULT_CHUNK_LINES = 256


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="batch_command", metavar="ACTION", required=True)
    run_p = actions.add_parser(
        "run",
        help="answer every line of a Batch API input file (resumes when run again)",
        description=__doc__,
        epilog="example: blipitm batch run requests.jsonl --output answers.jsonl",
    )
    run_p.add_argument("input", metavar="INPUT.jsonl", help="the batch's lines")
    run_p.add_argument("--output", required=True, metavar="OUT.jsonl", help="answers (appended)")
    run_p.add_argument(
        "--errors", metavar="ERR.jsonl", help="failed lines (default: into --output too)"
    )
    run_p.add_argument(
        "--window",
        type=int,
        default=64,
        metavar="W",
        help="lines in flight at once (default: 64); with --ray, in each actor",
    )
    ray_group = add_ray_options(
        run_p, doc="docs/batch.md#on-ray", does="answer the lines on Ray", actors="actors"
    )
    ray_group.add_argument(
        "--chunk-lines",
        type=int,
        default=DEFAULT_CHUNK_LINES,
        metavar="N",
        help="lines per Ray task; an interrupted run answers again at most 2 chunks per "
        f"actor (default: {DEFAULT_CHUNK_LINES})",
    )
    add_model_options(run_p, preset=SERVER_PRESET)
    run_p.set_defaults(run=run)


def _endpoint(path: Path) -> str:
    """The ``url`` of the file's first line (every line must share it: checked next)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (json.JSONDecodeError, AttributeError):
                    break
                if isinstance(url, str):
                    return url
                break
    raise InvalidInputError("the first line has no `url`", loc=("input",))


def run(args: argparse.Namespace) -> int:
    from blipitm.server.batch.lines import ENDPOINTS, check_lines

    pool = _ray_pool(args)
    source = Path(args.input)
    if not source.is_file():
        raise InvalidInputError(f"no file {source}", loc=("input",))
    endpoint = _endpoint(source)
    if endpoint not in ENDPOINTS:
        raise InvalidInputError(
            f"`url` {endpoint!r} is not a batch endpoint ({', '.join(ENDPOINTS)})", loc=("input",)
        )
    errors, total = check_lines(source, endpoint)
    if errors:
        for e in errors:
            print(f"blipitm: {source}:{e['line']}: {e['code']}: {e['message']}", file=sys.stderr)
        raise InvalidInputError(f"{len(errors)} bad lines; nothing was run", loc=("input",))
    options = options_from(model_values(args), base=SERVER_PRESET)
    counts = _answer(args, source, endpoint, total, options, pool)
    print(
        f"{counts['completed']} answered, {counts['failed']} failed, of {total}; see {args.output}"
        + (f" and {args.errors}" if args.errors else "")
    )
    return 0 if counts["failed"] == 0 else 1


# (flag, attribute, default) of the options that mean nothing without --ray.
_RAY_ONLY = (
    ("--workers", "workers", 1),
    ("--gpus-per-worker", "gpus_per_worker", 0.0),
    ("--cpus-per-worker", "cpus_per_worker", None),
    ("--chunk-lines", "chunk_lines", DEFAULT_CHUNK_LINES),
)


def _ray_pool(args: argparse.Namespace) -> RayPool | None:
    """The Ray actors ``--ray`` asks for (None: answer here), every flag checked before any
    model loads or Ray starts."""
    _check_numbers(args)
    if args.ray is None:
        for flag, value, default in _RAY_ONLY:
            if getattr(args, value) != default:
                raise InvalidInputError("takes effect only with --ray", loc=(flag,))
        return None
    if not args.ray.strip():
        raise InvalidInputError(
            "give a cluster's address (auto, HOST:6379, ray://HOST:10001), or none for a local Ray",
            loc=("--ray",),
        )
    return RayPool(args.ray, args.workers, args.gpus_per_worker, args.cpus_per_worker)


def _check_numbers(args: argparse.Namespace) -> None:
    check_positive(args.window, "--window")
    check_positive(args.chunk_lines, "--chunk-lines")
    check_positive(args.workers, "--workers")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise InvalidInputError(
            f"must be > 0, got {args.cpus_per_worker}", loc=("--cpus-per-worker",)
        )
    if args.gpus_per_worker < 0:
        raise InvalidInputError(
            f"must be >= 0, got {args.gpus_per_worker}", loc=("--gpus-per-worker",)
        )


def _answer(
    args: argparse.Namespace,
    source: Path,
    endpoint: str,
    total: int,
    options: LoadOptions,
    pool: RayPool | None,
) -> dict[str, int]:
    """Answer every line the output files do not answer yet, here or on ``pool``; the counts
    of the whole batch (earlier runs' answers included)."""
    from blipitm.cli.progress import ConsoleProgress
    from blipitm.server.batch.lines import AnswerFile, read_lines
    from blipitm.server.batch.offline import offline_batch
    from blipitm.server.batch.ray_lines import answer_on_ray
    from blipitm.server.batch.runner import Answers, recover

    batch = offline_batch(endpoint, str(source), total)
    out_path = Path(args.output)
    err_path = Path(args.errors) if args.errors else out_path
    done = set(recover(batch, out_path, err_path))
    if done:
        log.info("resuming: %d of %d lines already answered", len(done), total)
    out = AnswerFile(out_path)
    err = out if err_path == out_path else AnswerFile(err_path)
    answers = Answers(batch, out, err)
    progress = ConsoleProgress(units={"batch": "line"})
    counts = batch.request_counts

    def on_progress() -> None:
        progress("batch", counts["completed"] + counts["failed"], total)

    lines = (line for line in read_lines(source) if line.custom_id not in done)
    try:
        if pool is None:
            asyncio.run(_answer_here(options, batch, lines, answers, args.window, on_progress))
        else:
            answer_on_ray(
                lines, answers, pool, options, endpoint,
                window=args.window, chunk_lines=args.chunk_lines, on_chunk=on_progress,
            )  # fmt: skip
    finally:
        answers.close()
        progress.close()
    return counts


async def _answer_here(
    options: LoadOptions,
    batch: Batch,
    lines: Iterator[Line],
    answers: Answers,
    window: int,
    on_line: Callable[[], None],
) -> None:
    """The local run: the lines through the server's app in this process."""
    from blipitm.server.batch.offline import answer_lines, offline_app

    async with offline_app(options) as app:
        await answer_lines(app, batch, lines, answers, window, on_line)
