"""``blipitm`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from blipitm.cli import convert, index, score, search, serve
from blipitm.cli import eval as eval_cmd
from blipitm.common.version import __version__
from blipitm.errors import BlipitmError

COMMANDS = (score, convert, serve, eval_cmd, index, search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipitm",
        description="Exact, fast BLIP image-text matching (ITM probability and ITC cosine).",
    )
    parser.add_argument("--version", action="version", version=f"blipitm {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except BlipitmError as e:
        print(f"blipitm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blipitm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
