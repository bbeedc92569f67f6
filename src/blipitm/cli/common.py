"""Flags built from :mod:`blipitm.engine.options`, and loading the model they name.

Torch-free at import: every subcommand's parser is built from here, ``--help`` included.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from blipitm.common.memory import apply_memory_policy
from blipitm.common.ray_cluster import LOCAL
from blipitm.common.safeio import MAX_IMAGE_FILE_BYTES, UnreadableFileError, read_regular_file
from blipitm.engine.options import (
    LIMIT_OPTIONS,
    MODEL_OPTIONS,
    LoadOptions,
    Option,
    options_from,
)
from blipitm.errors import InvalidInputError

if TYPE_CHECKING:
    from blipitm.engine import Engine
    from blipitm.engine.captioner import Captioner

# With ``from_index``, these default to what the index's manifest records.
RECORDED = ("model", "protocol", "dtype")
# As for `blipitm serve`: the model every command loads unless --model says otherwise.
MODEL_ENV = "BLIPITM_MODEL"
MIB = 1 << 20


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


def add_model_options(
    p: argparse.ArgumentParser,
    *,
    from_index: bool = False,
    preset: LoadOptions | None = None,
    model_env: bool = True,
) -> None:
    """The model's flags and the engine's limits (``--cache-bytes``, ``--max-image-pixels``,
    ``--max-text-chars``), defaulting to ``preset`` (default: the library's defaults).
    ``from_index``: model, revision, protocol and dtype default to the index's manifest.
    ``model_env=False``: ``$BLIPITM_MODEL`` (an ITM model) is not the default (the captioner)."""
    g = p.add_argument_group("model")
    defaults = LoadOptions() if preset is None else preset
    for opt in MODEL_OPTIONS:
        assert opt.field is not None
        if opt.name == "model":
            # Read when the command runs (load_engine), so the help can state it as a rule.
            recorded = "the one the index was built with" if from_index else defaults.source
            shown = f"${MODEL_ENV} if set, else {recorded}" if model_env else recorded
            add_option(g, opt, default=None, shown=shown)
        elif from_index and opt.name in RECORDED:
            add_option(g, opt, default=None, shown="the one the index was built with")
        else:
            default = getattr(defaults, opt.field)
            add_option(g, opt, default=default, shown=default)
    limits = p.add_argument_group("engine limits")
    for opt in LIMIT_OPTIONS:
        assert opt.field is not None
        default = getattr(defaults, opt.field)
        add_option(limits, opt, default=default, shown=default)


class _CacheMbAlias(argparse.Action):
    """``--cache-mb MIB``, the filter's old spelling of ``--cache-bytes``: still works, says so."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"blipitm: warning: --cache-mb is deprecated; use --cache-bytes {int(values * MIB)}",
            file=sys.stderr,
        )
        namespace.cache_bytes = int(values * MIB)


def add_ray_options(
    p: argparse.ArgumentParser, *, doc: str, does: str, actors: str
) -> argparse._ArgumentGroup:
    """``--ray [ADDRESS]``, ``--workers``, ``--gpus-per-worker`` and ``--cpus-per-worker``, one
    spelling for every command that can run on Ray; the group, for a command's own Ray flags.
    ``doc``: where its docs say how; ``does``: what ``--ray`` does (``"score on Ray Data"``);
    ``actors``: what the workers are."""
    r = p.add_argument_group(f"Ray ({doc})")
    r.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help=f"{does}: a local Ray started here, or the cluster at ADDRESS "
        "(e.g. auto, ray://head:10001)",
    )
    r.add_argument("--workers", type=int, default=1, metavar="N", help=f"{actors} (default: 1)")
    r.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per actor (default: 0)",
    )
    r.add_argument(
        "--cpus-per-worker",
        type=float,
        metavar="C",
        help="CPUs per actor (default: a one-machine Ray's CPUs / workers; 1 on a cluster)",
    )
    return r


def add_cache_mb_alias(p: argparse.ArgumentParser) -> None:
    """The deprecated ``--cache-mb`` (MiB, a float) for ``--cache-bytes``; not in ``--help``."""
    p.add_argument("--cache-mb", type=float, action=_CacheMbAlias, help=argparse.SUPPRESS)


def load_engine(
    args: argparse.Namespace,
    *,
    index: str | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> Engine:
    """Load the model the options name; unset ones come from the index's manifest if given
    (``manifest``, or read from ``index``)."""
    from blipitm.engine import load_options  # torch: only once a command runs

    apply_memory_policy()  # this process decodes images: a decode budget bounds its memory
    values = model_values(args)
    if (index is not None or manifest is not None) and any(
        values[name] is None for name in RECORDED
    ):
        if manifest is None:
            from blipitm.retrieval import Index

            with Index.open(str(index)) as opened:
                manifest = opened.manifest
        recorded = manifest["model"]
        if values["model"] is None:
            values["model"] = recorded["source"]
            values["revision"] = values["revision"] or recorded.get("revision")
        values["protocol"] = values["protocol"] or recorded["protocol"]
        values["dtype"] = values["dtype"] or recorded["dtype"]
    if values["model"] is None:
        values["model"] = LoadOptions().source
    if sys.stderr.isatty():  # the load takes seconds and logs nothing without -v: say so
        print(f"loading model {values['model']} ...", file=sys.stderr, flush=True)
    return load_options(options_from(values))


def load_captioner(args: argparse.Namespace, *, default_model: str) -> Captioner:
    """Load the captioner the options name (``default_model`` without ``--model``; the ITM
    model of ``$BLIPITM_MODEL`` is no captioner)."""
    from blipitm.engine.captioner import load_captioner_options  # torch: only once it runs

    apply_memory_policy()
    values = dict(vars(args))
    if values.get("model") is None:
        values["model"] = default_model
    if sys.stderr.isatty():
        print(f"loading model {values['model']} ...", file=sys.stderr, flush=True)
    return load_captioner_options(options_from(values))


def model_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags, with --model from ``$BLIPITM_MODEL`` when the flag is absent."""
    values = dict(vars(args))
    if values.get("model") is None and os.environ.get(MODEL_ENV):
        values["model"] = os.environ[MODEL_ENV]
    return values


def check_image_file(path: str, loc: tuple[str | int, ...] = ("image",)) -> None:
    """Refuse, before any model is loaded, an IMAGE argument that cannot be an image: missing,
    not a regular file (a FIFO, a device), over :data:`MAX_IMAGE_FILE_BYTES`, or a file that
    PIL does not recognise (a text file). Reads the file once; torch-free."""
    try:
        data = read_regular_file(path, max_bytes=MAX_IMAGE_FILE_BYTES, what="image file")
    except UnreadableFileError as e:
        raise InvalidInputError(str(e), loc=loc) from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise InvalidInputError(f"cannot read image file {path}: {reason}", loc=loc) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            pass  # the header is enough to know a format; decoding is the engine's
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidInputError(
            f"{path} is not an image file (PIL cannot identify its format)", loc=loc
        ) from None


def check_positive(value: int | None, flag: str, *, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise InvalidInputError(f"must be >= {minimum}, got {value}", loc=(flag,))


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 image``, ``2 images``; ``words`` for irregular plurals."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
