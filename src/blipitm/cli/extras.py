"""The optional dependencies (``pyproject.toml``'s extras) each command needs, and the one line
that names the ``pip install`` fixing a missing one.

The core install is the library (``blipitm.load``, scoring, retrieval); the server, filtering and
plots are extras, imported only by the code that uses them. A command checks its extra before it
starts (before a model loads), and an import of an extra's package that still fails later is
reported the same way.
"""

from __future__ import annotations

import importlib.util

from blipitm.errors import BlipitmError

# extra: (what needs it, the import names of its packages). Keep in step with pyproject.toml.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "server": (
        "the server",
        (
            *("fastapi", "starlette", "pydantic", "fastapi_swagger", "uvicorn", "h11"),
            *("prometheus_client", "httpx", "matplotlib", "python_multipart"),
        ),
    ),
    "filter": ("filtering", ("pyarrow", "matplotlib")),
    "plot": ("drawing plots and overlays", ("matplotlib",)),
}
# The commands that need an extra to run at all.
COMMAND_EXTRAS = {
    "serve": "server",
    "batch": "server",
    "filter": "filter",
    "eval": "plot",
    "explain": "plot",
}


class MissingExtraError(BlipitmError):
    """A package of one of blipitm's extras is not installed."""


def message(extra: str) -> str:
    return f"{EXTRAS[extra][0]} needs its extra: pip install 'blipitm[{extra}]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder refused it outright
        return False


def require(command: str | None) -> None:
    """Raise :class:`MissingExtraError` if ``command`` needs an extra that is not installed."""
    extra = COMMAND_EXTRAS.get(command or "")
    if extra is not None and not all(_installed(m) for m in EXTRAS[extra][1]):
        raise MissingExtraError(message(extra))


def explain_missing(error: ModuleNotFoundError, command: str | None) -> MissingExtraError | None:
    """The extra that provides the module ``error`` could not import (the command's own extra
    first), or None for a module no extra provides (that is not ours to word)."""
    top = (error.name or "").partition(".")[0]
    own = COMMAND_EXTRAS.get(command or "")
    candidates = [own] if own is not None else []
    candidates += [e for e in EXTRAS if e != own]
    for extra in candidates:
        if top in EXTRAS[extra][1]:
            return MissingExtraError(message(extra))
    return None
