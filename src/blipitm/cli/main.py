"""``blipitm`` command line: a table of subcommands, one module each with ``add_parser``.

Only the subcommand a command line names is imported, and no subcommand module imports torch or
the engine before its ``run`` does, so ``blipitm --help`` and ``blipitm CMD --help`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from blipitm.cli import extras
from blipitm.common.version import __version__
from blipitm.errors import BlipitmError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # has add_parser(sub, name, help) -> None


COMMANDS = (
    Command("score", "score an image against one or more texts", "blipitm.cli.score"),
    Command("caption", "write captions for images (BLIP's captioner)", "blipitm.cli.caption"),
    Command(
        "explain",
        "show where captions match an image (Grad-CAM overlays)",
        "blipitm.cli.explain",
    ),
    Command(
        "convert",
        "convert an original BLIP .pth checkpoint to a Hugging Face directory",
        "blipitm.cli.convert",
    ),
    Command(
        "serve",
        "serve the model over HTTP (OpenAI / vLLM / Cohere compatible)",
        "blipitm.cli.serve",
    ),
    Command("eval", "retrieval recall (BLIP's Flickr30k / COCO protocol)", "blipitm.cli.eval"),
    Command("index", "build and maintain a retrieval index", "blipitm.cli.index"),
    Command("search", "search an index with a caption or an image", "blipitm.cli.search"),
    Command("filter", "score an image-caption dataset and keep the matches", "blipitm.cli.filter"),
    Command("keys", "per-key API keys: limits, credits, usage", "blipitm.cli.keys"),
    Command("batch", "answer a Batch API file offline (OpenAI's batch lines)", "blipitm.cli.batch"),
)


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``full`` names the subcommands whose arguments it has (default: all). The
    others have just their one-line help, and their modules are not imported."""
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
        if full is None or command.name in full:
            module = importlib.import_module(command.module)
            module.add_parser(sub, command.name, command.help)
        else:
            sub.add_parser(command.name, help=command.help)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """``-v`` after the subcommand too (``blipitm index build ... -v``): each subparser counts
    its own into ``sub_verbose``, which main adds to the top level's count."""
    for parser in set(sub.choices.values()):
        parser.add_argument(
            "-v",
            "--verbose",
            dest=f"sub_verbose_{id(parser)}",
            action="count",
            default=0,
            help="log more (-v info, -vv debug)",
        )
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def _verbosity(args: argparse.Namespace) -> int:
    return int(args.verbose) + sum(
        int(v) for k, v in vars(args).items() if k.startswith("sub_verbose_")
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level options take no value, so the first word that is not an option is the command.
    named = [word for word in argv if not word.startswith("-")][:1]
    try:
        parser = build_parser(full=named)
    except ModuleNotFoundError as e:  # a command module that needs an extra at import
        return _missing_extra(e, named[0] if named else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(_verbosity(args), 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        extras.require(args.command)
        return int(args.run(args))
    except BlipitmError as e:
        print(f"blipitm: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        return _missing_extra(e, args.command)
    except KeyboardInterrupt:
        print("blipitm: interrupted", file=sys.stderr)
        return 130


def _missing_extra(error: ModuleNotFoundError, command: str | None) -> int:
    """One line naming the extra to install, for a package of one of ours; else the traceback."""
    missing = extras.explain_missing(error, command)
    if missing is None:
        raise error
    print(f"blipitm: error: {missing}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
