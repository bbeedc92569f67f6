"""``blipitm batch run``: a Batch API input file answered offline, without a server.

The same lines as ``POST /v1/batches`` (OpenAI's ``{"custom_id", "method", "url", "body"}``), the
same answers (each line goes through the server's app, in process, unmetered), written to
``--output`` (and the failed ones to ``--errors``, or to the output too). Run again, it resumes:
the lines already answered in the output files are not redone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from blipitm.cli.common import add_model_options, model_values
from blipitm.engine.options import SERVER_PRESET, options_from
from blipitm.errors import InvalidInputError

log = logging.getLogger("blipitm")


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
        "--window", type=int, default=64, help="lines in flight at once (default: 64)"
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
    counts = asyncio.run(_run(args, source, endpoint, total, options))
    print(
        f"{counts['completed']} answered, {counts['failed']} failed, of {total}; see {args.output}"
        + (f" and {args.errors}" if args.errors else "")
    )
    return 0 if counts["failed"] == 0 else 1


async def _run(
    args: argparse.Namespace, source: Path, endpoint: str, total: int, options: Any
) -> dict[str, int]:
    from blipitm.cli.progress import ConsoleProgress
    from blipitm.server.account import SCOPE_BACKGROUND
    from blipitm.server.app import create_app, no_extensions
    from blipitm.server.batch.lines import AnswerFile, read_lines
    from blipitm.server.batch.runner import Answers, recover, send_lines
    from blipitm.server.batch.store import Batch
    from blipitm.server.settings import ServerSettings

    settings = ServerSettings(load=options, max_wait_ms=5.0)
    out_path = Path(args.output)
    err_path = Path(args.errors) if args.errors else out_path
    batch = Batch("offline", None, endpoint, str(source), "24h", status="in_progress")
    batch.expires_at = math.inf  # type: ignore[assignment]
    batch.request_counts["total"] = total
    done = set(recover(batch, out_path, err_path))
    if done:
        log.info("resuming: %d of %d lines already answered", len(done), total)
    out = AnswerFile(out_path)
    err = out if err_path == out_path else AnswerFile(err_path)
    answers = Answers(batch, out, err)
    progress = ConsoleProgress(units={"batch": "line"})
    counts = batch.request_counts

    def on_line() -> None:
        progress("batch", counts["completed"] + counts["failed"], total)

    app = create_app(settings, extensions=no_extensions)
    try:
        async with app.router.lifespan_context(app):
            state = app.state.blipitm
            while not state.ready:
                if state.load_error is not None:
                    raise InvalidInputError(state.load_error, loc=("model",))
                await asyncio.sleep(0.1)
            lines = (line for line in read_lines(source) if line.custom_id not in done)
            await send_lines(
                app, batch, lines, answers, {SCOPE_BACKGROUND: True}, args.window,
                asyncio.Event(), on_line,
            )  # fmt: skip
    finally:
        answers.close()
        progress.close()
    return counts
