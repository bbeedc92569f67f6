"""Which uvicorn the connection layer runs on.

It extends uvicorn internals (the package docstring lists each one), so a uvicorn outside the range
it was tested with is refused when the server starts, in one line, rather than failing later in a
connection. Importing the package checks nothing: only :func:`check_uvicorn` does.
"""

from __future__ import annotations

import re

import uvicorn

from blipitm.errors import BlipitmError

# The range pyproject.toml requires (tests/test_transport_internals.py keeps the two equal): the
# oldest release whose internals were checked, up to the minor after the newest one tested.
UVICORN_MIN = (0, 41)
UVICORN_BELOW = (0, 55)
SUPPORTED_UVICORN = ">=0.41,<0.55"


class UnsupportedUvicornError(BlipitmError):
    """The installed uvicorn is outside :data:`SUPPORTED_UVICORN`."""


def _release(version: str) -> tuple[int, int] | None:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def check_uvicorn() -> None:
    """Raise :class:`UnsupportedUvicornError` unless the installed uvicorn is in the range."""
    installed = str(getattr(uvicorn, "__version__", "unknown"))
    release = _release(installed)
    if release is None or not UVICORN_MIN <= release < UVICORN_BELOW:
        raise UnsupportedUvicornError(
            f"uvicorn {installed} is installed, but the server's connection layer supports "
            f"uvicorn{SUPPORTED_UVICORN} only (it extends uvicorn internals): "
            f"pip install 'uvicorn{SUPPORTED_UVICORN}'"
        )
