"""What to load and how: one frozen, validated record shared by ``load()``, the CLI and the server.

:class:`LoadOptions` is checked once, when it is built, so a bad value fails before anything is
read from disk, with the same message from every entry point. Its field defaults are the
library's; :data:`SERVER_PRESET` and :data:`FILTERING_PRESET` are the same record with the
defaults ``blipitm serve`` and ``blipitm filter`` (and :func:`~blipitm.filtering.filter_dataset`)
start from, so no other module restates a default. :data:`LOAD_OPTIONS` declares how the options
a user sets appear outside Python (flag, ``BLIPITM_*`` environment variable, help): the CLI
builds its flags from it and the server's settings table reuses it.

No torch here (``blipitm.engine`` loads its other names on first use), so ``blipitm --help`` and
the server's settings stay cheap; :mod:`blipitm.engine.loader` turns the dtype names into torch
dtypes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from blipitm.config import ATTN_IMPLS, DEFAULT_MAX_PIXELS, AttnImpl
from blipitm.engine.types import DTYPE_NAMES, WEIGHT_DTYPE_NAMES, BatchSizes, Dtype, WeightDtype
from blipitm.errors import InvalidInputError
from blipitm.scoring import PROTOCOL_NAMES, ProtocolName

DEFAULT_MODEL = "Salesforce/blip-itm-base-flickr"
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"  # blipitm.load_captioner
DEFAULT_CACHE_BYTES = 512 << 20
DEFAULT_MAX_TEXT_CHARS = 100_000
ENV_PREFIX = "BLIPITM_"


@dataclass(frozen=True)
class LoadOptions:
    """Which checkpoint to load, how to run it, and the engine's input limits.

    ``source``: a hub id (``revision`` pins it), a local Hugging Face directory, or an original
    BLIP/LAVIS ``.pth`` file (then ``tokenizer`` names the tokenizer directory or hub id).
    ``protocol``: ``"blip"`` (the model as Salesforce evaluated it) or ``"transformers"``
    (bit-compatible with ``transformers.BlipForImageTextRetrieval``); see the README.
    ``dtype`` is how the weights are stored; ``compute_dtype`` (default: ``dtype`` where the
    hardware runs it natively, else float32) is what the arithmetic runs in. ``dtype="int8"``
    (CPU only, opt-in) runs the towers' linear layers in dynamic int8 and the rest in float32.
    ``max_pixels`` (None: no limit) and ``max_text_chars`` bound each input; ``decode_threads``
    and ``decode_budget_pixels`` (full-size pixels decoded at once; default ``max_pixels``)
    bound the image decoding; see :class:`~blipitm.engine.engine.Engine`.
    """

    source: str | os.PathLike[str] = DEFAULT_MODEL
    revision: str | None = None
    tokenizer: str | os.PathLike[str] | None = None
    device: str = "cpu"  # checked against the machine when loading: that needs torch
    dtype: WeightDtype = "float32"
    protocol: ProtocolName = "blip"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    cache_bytes: int = DEFAULT_CACHE_BYTES
    batch_sizes: BatchSizes | None = None
    attn_impl: AttnImpl = "sdpa"
    compute_dtype: Dtype | None = None
    decode_threads: int | None = None
    decode_budget_pixels: int | None = None

    def __post_init__(self) -> None:
        _check_choice("protocol", self.protocol, PROTOCOL_NAMES)
        _check_choice("dtype", self.dtype, WEIGHT_DTYPE_NAMES)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        if self.compute_dtype is not None:
            _check_choice("compute_dtype", self.compute_dtype, DTYPE_NAMES)
        for name in ("max_pixels", "max_text_chars", "decode_budget_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"must be >= 1, got {value}", loc=(name,))
        if self.cache_bytes < 0:
            raise InvalidInputError(f"must be >= 0, got {self.cache_bytes}", loc=("cache_bytes",))

    def replace(self, **changes: Any) -> LoadOptions:
        """A copy with ``changes`` (field names), checked like any new record."""
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"must be one of {choices}, got {value!r}", loc=(name,))


# -- presets: the defaults each entry point starts from ------------------------------------------

# ``blipitm serve``: a long-lived process answering untrusted clients, so a bigger image cache
# (the same images come back across requests) and tighter input limits than the library's
# (10,000 characters, 40 M pixels: what one request may make the server tokenize and decode).
# Its decode budget (80 M full-size pixels, about 320 MB) holds two largest images at once.
SERVER_PRESET = LoadOptions(
    cache_bytes=1 << 30,
    max_text_chars=10_000,
    max_pixels=40_000_000,
    decode_budget_pixels=80_000_000,
)
# ``blipitm filter`` and ``filter_dataset``: a dataset's images are mostly distinct, so a large
# cache is memory held for nothing; 64 MiB still covers the re-scoring after a bad image
# (docs/filtering.md, "Identical images and the engine cache").
FILTERING_PRESET = LoadOptions(cache_bytes=64 << 20)


# -- the options as flags and environment variables ----------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting as the outside world sees it: a flag, an environment variable, a help line."""

    name: str  # the flag (--name-with-dashes), the variable (BLIPITM_NAME), the settings field
    help: str
    parse: Callable[[str], Any] = str  # environment string -> value
    kind: str = "value"  # "value", "flag" (store_true) or "list" (repeatable flag)
    choices: tuple[str, ...] | None = None
    flag_name: str | None = None  # overrides --name-with-dashes
    metavar: str | None = None
    field: str | None = None  # the LoadOptions field it sets, where it names one

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def optional_str(value: str) -> str | None:
    return value or None


MODEL_OPTIONS: tuple[Option, ...] = (
    Option("model", "hub id, local Hugging Face directory or BLIP .pth file", field="source"),
    Option("revision", "hub branch, tag or commit to pin", optional_str, field="revision"),
    Option(
        "tokenizer",
        "tokenizer directory or hub id for a .pth model (default: bert-base-uncased)",
        optional_str,
        field="tokenizer",
    ),
    Option(
        "protocol",
        "scoring protocol; blip: as Salesforce evaluated it, transformers: bit-compatible with "
        "Hugging Face (see the README)",
        choices=PROTOCOL_NAMES,
        field="protocol",
    ),
    Option("device", "cpu, cuda or cuda:N", field="device"),
    Option(
        "dtype",
        "dtype the weights are stored in; int8: dynamic int8 linear layers (CPU, opt-in)",
        choices=WEIGHT_DTYPE_NAMES,
        field="dtype",
    ),
)
LIMIT_OPTIONS: tuple[Option, ...] = (
    Option(
        "cache_bytes",
        "bytes of encoded images kept in the engine's cache",
        int,
        field="cache_bytes",
    ),
    Option(
        "max_image_pixels",
        "largest image (width x height); larger is refused (the server: 413)",
        int,
        field="max_pixels",
    ),
    Option(
        "max_decoded_pixels",
        "full-size pixels decoding at once, across all work (about 4 bytes each; default: "
        "--max-image-pixels); more waits, one image over it is refused (the server: 413)",
        int,
        field="decode_budget_pixels",
    ),
    Option(
        "max_text_chars",
        "longest text (characters); longer is refused (the server: 400)",
        int,
        field="max_text_chars",
    ),
)
LOAD_OPTIONS = MODEL_OPTIONS + LIMIT_OPTIONS


def options_from(values: Mapping[str, Any], base: LoadOptions | None = None) -> LoadOptions:
    """``base`` (default: the library's defaults; or a preset) with the option values keyed by
    :data:`LOAD_OPTIONS` names (parsed flags, server settings); an absent or None value keeps
    ``base``'s. Other keys are ignored. A bad value names its option."""
    given = {
        o.field: values[o.name]
        for o in LOAD_OPTIONS
        if o.field is not None and values.get(o.name) is not None
    }
    try:
        return LoadOptions(**given) if base is None else base.replace(**given)
    except InvalidInputError as e:
        name = next((o.name for o in LOAD_OPTIONS if o.field == e.field), e.field)
        raise InvalidInputError(e.reason, loc=(name,) if name else ()) from None
