"""The web playground at ``/`` and ``/playground``: static HTML, CSS and JavaScript shipped in the
package (``blipitm/server/playground/``), no build step, nothing from another host. The page is a
client of the public API (``/v1/models``, ``/v1/explain``) like any other; it needs no key to load,
and sends the key its user types (kept in the tab's session storage) as ``Authorization``.

Its responses carry a strict Content-Security-Policy: scripts, styles and requests only from this
server, images also from ``data:``/``blob:`` (the uploaded image), no framing. The API routes'
responses are unchanged.
"""

from __future__ import annotations

import functools
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from blipitm.server.errors import APIError, ErrorCode

router = APIRouter(include_in_schema=False)

_ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@functools.cache
def _file(name: str) -> bytes:
    return files("blipitm.server").joinpath("playground", name).read_bytes()


def _served(name: str, media_type: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return Response(_file(name), media_type=media_type, headers=headers)


def _page() -> Response:
    return _served("index.html", "text/html; charset=utf-8")


@router.get("/")
async def root() -> Response:
    return _page()


@router.get("/playground")
async def playground() -> Response:
    return _page()


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no playground asset {name!r}", code=ErrorCode.NOT_FOUND)
    return _served(name, media_type)
