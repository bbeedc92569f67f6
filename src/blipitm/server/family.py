"""The models one server serves: a :class:`ModelSpec` each, from the flags or a models file.

``blipitm serve --model A --model B`` serves A (the default, for requests that name no model) and
B with the same options. ``--models-file models.toml`` names each model with its own settings::

    [[model]]
    source = "Salesforce/blip-itm-base-flickr"   # hub id, local directory or .pth (required)
    name = "blip-base"                            # what clients pass as `model` (default: source)
    aliases = ["base", "flickr"]                  # other names that resolve to it
    protocol = "blip"                             # any load option: revision, tokenizer, device,
    dtype = "bfloat16"                            #   dtype, cache_bytes, max_image_pixels, ...
    index = "indexes/base"                        # its /v1/search index
    preload = true                                # false: loaded on its first request
    kind = "itm"                                  # or "caption" (default: what it holds)
    text_credits = 1                              # what a text costs a metered key
    image_credits = 2                             # what an image costs (default: --image-credits)

With ``--models-file`` the file names every model served, its first the default; ``--model``,
``--served-model-name`` and ``--index`` are then not used, and the other flags (``--dtype``,
``--cache-bytes``, ``--image-credits``, ...) are each model's defaults.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.config import Task
from blipitm.engine.options import LOAD_OPTIONS, LoadOptions, options_from
from blipitm.errors import InvalidInputError


@dataclass(frozen=True)
class Price:
    """Credits a metered key pays per text and per image sent to one model."""

    text: int = 1
    image: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """One served model: how it loads, the names it answers to, its index and its price."""

    name: str  # the name clients pass as `model` and see in /v1/models
    load: LoadOptions
    aliases: tuple[str, ...] = ()  # more names that resolve to it (the source string among them)
    index: str | None = None  # the /v1/search index, bound to this model's manifest
    preload: bool = True  # False: loaded on its first request
    price: Price = Price()
    kind: Task | None = None  # "itm" or "caption", as the file says; None: found when loaded

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this model answers to, its served name first."""
        return (self.name, *(a for a in self.aliases if a != self.name))


_SPEC_KEYS = {
    "source", "name", "aliases", "index", "preload", "text_credits", "image_credits", "kind"
}  # fmt: skip
_KINDS: tuple[Task, ...] = ("itm", "caption")
_LOAD_KEYS = {o.name for o in LOAD_OPTIONS} - {"model"}  # `source` names the model in a file


def read_models_file(path: str | Path, base: LoadOptions, image_credits: int) -> list[ModelSpec]:
    """The models of a TOML models file; each starts from ``base`` (the flags' load options).
    A bad file, key or value is an :class:`InvalidInputError` naming the file and the entry."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"no models file at {where}", loc=("models_file",)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidInputError(f"cannot read {where}: {e}", loc=("models_file",)) from None
    unknown = set(data) - {"model"}
    entries = data.get("model")
    if unknown or not isinstance(entries, list) or not entries:
        raise InvalidInputError(
            f"{where} must hold [[model]] tables only, at least one"
            + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""),
            loc=("models_file",),
        )
    return [
        _spec(entry, base, image_credits, f"{where}: model[{i}]") for i, entry in enumerate(entries)
    ]


def _spec(entry: Any, base: LoadOptions, image_credits: int, where: str) -> ModelSpec:
    if not isinstance(entry, Mapping):
        raise InvalidInputError(f"{where} must be a table", loc=("models_file",))
    unknown = set(entry) - _SPEC_KEYS - _LOAD_KEYS
    if unknown:
        known = ", ".join(sorted(_SPEC_KEYS | _LOAD_KEYS))
        raise InvalidInputError(
            f"{where} has unknown keys {', '.join(sorted(unknown))} (known: {known})",
            loc=("models_file",),
        )
    source = entry.get("source")
    if not isinstance(source, str) or not source:
        raise InvalidInputError(f"{where} needs `source` (a string)", loc=("models_file",))
    try:
        load = options_from(
            {"model": source, **{k: entry[k] for k in _LOAD_KEYS & set(entry)}}, base
        )
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e.reason}", loc=("models_file", *e.loc)) from None
    name = _typed(entry, "name", str, source, where)
    aliases = _typed(entry, "aliases", list, [], where)
    if not all(isinstance(a, str) and a for a in aliases):
        raise InvalidInputError(
            f"{where}: `aliases` must be non-empty strings", loc=("models_file",)
        )
    text = _typed(entry, "text_credits", int, 1, where)
    image = _typed(entry, "image_credits", int, image_credits, where)
    if text < 0 or image < 0:
        raise InvalidInputError(f"{where}: credits must be >= 0", loc=("models_file",))
    kind = _typed(entry, "kind", str, None, where)
    if kind is not None and kind not in _KINDS:
        raise InvalidInputError(
            f"{where}: `kind` is one of {', '.join(_KINDS)}, got {kind!r}", loc=("models_file",)
        )
    return ModelSpec(
        name=name,
        load=load,
        aliases=tuple(dict.fromkeys([*aliases, source])),
        index=_typed(entry, "index", str, None, where),
        preload=_typed(entry, "preload", bool, True, where),
        price=Price(text, image),
        kind=kind,
    )


def _typed(entry: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = entry.get(key, default)
    if value is not default and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        raise InvalidInputError(
            f"{where}: `{key}` must be {kind.__name__}, got {type(value).__name__}",
            loc=("models_file",),
        )
    return value


def check_names(specs: Sequence[ModelSpec]) -> None:
    """Every name (served names and aliases) resolves to one model."""
    owner: dict[str, int] = {}
    for i, spec in enumerate(specs):
        for name in spec.names:
            j = owner.setdefault(name, i)
            if j != i:
                raise InvalidInputError(
                    f"the name {name!r} is given to two models ({specs[j].name!r} and "
                    f"{spec.name!r}); give each model its own name (--served-model-name, "
                    "`name` or `aliases`)",
                    loc=("models",),
                )
