"""blipitm's version: pyproject.toml is its one source, read from the installed metadata once."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    try:
        return version("blipitm")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()
