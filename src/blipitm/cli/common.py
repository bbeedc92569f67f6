"""Flags built from :mod:`blipitm.engine.options`, and loading the model they name.

Torch-free at import: every subcommand's parser is built from here, ``--help`` included.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from blipitm.engine.options import MODEL_OPTIONS, LoadOptions, Option, options_from

if TYPE_CHECKING:
    from blipitm.engine import Engine

# With ``from_index``, these default to what the index's manifest records.
RECORDED = ("model", "protocol", "dtype")


def add_option(
    p: argparse._ActionsContainer, opt: Option, *, default: Any, shown: Any = None, note: str = ""
) -> None:
    """``opt`` as a flag; ``default`` is its value when absent, ``shown`` the default its help
    states (None: the help states none)."""
    help_text = opt.help + ("" if shown is None else f" (default: {shown})") + note
    if opt.kind == "flag":
        p.add_argument(
            opt.flag, dest=opt.name, action="store_true", default=default, help=help_text
        )
    elif opt.kind == "list":
        p.add_argument(
            opt.flag,
            dest=opt.name,
            action="append",
            default=default,
            metavar=opt.metavar,
            help=help_text,
        )
    else:
        p.add_argument(
            opt.flag,
            dest=opt.name,
            type=opt.parse,
            choices=opt.choices,
            default=default,
            metavar=opt.metavar,
            help=help_text,
        )


def add_model_options(p: argparse.ArgumentParser, *, from_index: bool = False) -> None:
    """``from_index``: model, revision, protocol and dtype default to the index's manifest."""
    g = p.add_argument_group("model")
    defaults = LoadOptions()
    for opt in MODEL_OPTIONS:
        assert opt.field is not None
        if from_index and opt.name in RECORDED:
            add_option(g, opt, default=None, shown="the one the index was built with")
        else:
            default = getattr(defaults, opt.field)
            add_option(g, opt, default=default, shown=default)


def load_engine(args: argparse.Namespace, *, index: str | None = None) -> Engine:
    """Load the model the options name; unset ones come from ``index``'s manifest if given."""
    from blipitm.engine import load_options  # torch: only once a command runs

    values = dict(vars(args))
    if index is not None and any(values[name] is None for name in RECORDED):
        from blipitm.retrieval import Index

        with Index.open(index) as opened:
            recorded = opened.manifest["model"]
        if values["model"] is None:
            values["model"] = recorded["source"]
            values["revision"] = values["revision"] or recorded.get("revision")
        values["protocol"] = values["protocol"] or recorded["protocol"]
        values["dtype"] = values["dtype"] or recorded["dtype"]
    return load_options(options_from(values))
