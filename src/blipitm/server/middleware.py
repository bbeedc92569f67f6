"""Pure ASGI middleware: request metrics, and the body guards (limits before any body is read).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because the routes listen on ``receive``
for the client's disconnect, which ``BaseHTTPMiddleware`` would hide. The gateway's middleware
(``server/gateway/middleware.py``) sits between the two and checks the key before the body guards
read a byte, so an unauthenticated client cannot make the server buffer a large body; and a body
is read only for a route that takes one: ``POST /health`` or an unknown path is answered 405 / 404
from its head (the connection layer then closes, discarding the body unread).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

from blipitm.common.safeio import JSONDepthError, loads_json
from blipitm.server.errors import APIError, ErrorCode, envelope
from blipitm.server.metrics import Metrics
from blipitm.server.schemas import item_limit

log = logging.getLogger("blipitm.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: ErrorCode | str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> None:
    body = json.dumps(envelope(status, message, code, param)).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def send_api_error(send: Send, err: APIError) -> None:
    await send_error(send, err.status, err.message, err.code, err.headers, err.param)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


# The status counted for a request that ended without a response: the client went away first
# (nginx's convention). Nothing was sent, so it is not a server error.
CLIENT_CLOSED = 499


class MetricsMiddleware:
    """Counts every response by route template and status, and times it."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def route_label(self, scope: Scope) -> str:
        return route_label(self.routes, scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.route_label(scope)
        status: int | None = None
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # an unhandled error becomes a 500 outside this middleware
            status = status or 500
            raise
        finally:
            label = str(status or CLIENT_CLOSED)
            self.metrics.requests.labels(route=route, status=label).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route ``scope`` addresses (``/v1/models/{model}``), else "other".

    Matched before the app runs, so requests refused by the guard (401, 413) are labelled by their
    route too. Never the raw path: clients would create unbounded label sets (metrics, usage).
    """
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return _template(route)
        if match is Match.PARTIAL and partial is None:  # right path, wrong method (405)
            partial = _template(route)
    return partial or "other"


def _template(route: BaseRoute) -> str:
    # ``path_format`` drops convertors: "/v1/models/{model}", not "/v1/models/{model:path}".
    return str(getattr(route, "path_format", None) or getattr(route, "path", "other"))


# The ASGI scope extension by which the connection layer (http.py) learns that a request's key was
# valid: ``{"callback": f}``; such a connection is never displaced at the connection cap.
KEY_ACCEPTED = "blipitm.key_accepted"


def key_accepted(scope: Scope) -> None:
    """Tell the connection layer that this request's key was valid (the gateway calls it)."""
    callback = scope.get("extensions", {}).get(KEY_ACCEPTED, {}).get("callback")
    if callback is not None:
        callback()


# Routes that read their own body as it streams (a Batch API upload: up to 200 MB, multipart).
STREAMED_PATHS = frozenset({"/v1/files"})


class GuardMiddleware:
    """Body guards: JSON content type, body-size limits, lone surrogates, and the item cap while
    the body is validated. A body is read only for a route that takes one."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_items: int,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_items = max_items
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._checked(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in STREAMED_PATHS:  # its route streams the body under its own caps
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH") or not self._takes_body(scope):
            # No route here reads a body: the app answers (404 / 405) without it being read.
            await self.app(scope, receive, send)
            return
        refused = self._refused_headers(scope)
        if refused is not None:
            await send_error(send, *refused)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        problem = _unicode_problem(body)
        if problem is not None:
            message, code, param = problem
            await send_error(send, 400, message, code, param=param)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the real channel (disconnect notice)

        with item_limit(self.max_items):  # every request list is bounded before validation
            await self.app(scope, replay, send)

    def _takes_body(self, scope: Scope) -> bool:
        """Whether a route matches ``scope`` with its method (without routes: assume so)."""
        if not self.routes:
            return True
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    def _refused_headers(self, scope: Scope) -> tuple[int, str, ErrorCode] | None:
        """(status, message, code) when Content-Type or a declared length refuses the request."""
        content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return (
                415,
                f"Content-Type must be application/json, got {content_type or 'none'!r}",
                ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            )
        declared = header(scope, b"content-length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            return 413, self._too_large, ErrorCode.REQUEST_TOO_LARGE
        return None

    @property
    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The body, read under the cap (chunked uploads have no Content-Length); None when the
        client left or the body was over the cap (then the 413 is sent)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, 413, self._too_large, ErrorCode.REQUEST_TOO_LARGE)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# A lone surrogate reaches a JSON body only as a \uD800-\uDFFF escape: raw surrogate bytes are not
# UTF-8 and fail parsing. So only a body holding such an escape is parsed a second time here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_problem(body: bytes) -> tuple[str, ErrorCode, str | None] | None:
    """(message, code, param) of the 400 for a body with a lone surrogate, or nested too deep to
    scan for one; None if it has neither."""
    try:
        param = lone_surrogate_param(body)
    except JSONDepthError as e:
        return f"the request body is not valid: {e}", ErrorCode.INVALID_JSON, None
    if param is None:
        return None
    return (
        f"{param or 'the body'} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
        "which is not Unicode text; send valid UTF-8",
        ErrorCode.INVALID_UNICODE,
        param or None,
    )


def lone_surrogate_param(body: bytes) -> str | None:
    """Where the JSON ``body`` holds a string with a lone surrogate (``documents[1].text``; ""
    for the body itself), or None if it holds none.

    Checked for every request before any route sees it: such a string cannot be encoded as UTF-8,
    so echoing it (a rerank document) or tokenizing it would fail deep inside, as a 500. A valid
    pair (``\\ud83d\\ude00``) decodes to one character and passes. Raises
    :class:`JSONDepthError` for a body nested deeper than any request (which no route accepts).
    """
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        value = loads_json(body)
    except JSONDepthError:
        raise
    except ValueError:
        return None  # not JSON: the route's validation answers that with its own 422
    return _find_surrogate(value)


def _find_surrogate(value: object) -> str | None:
    """The first string (or key) holding a surrogate, depth first; iterative, so any nesting is
    safe (``loads_json`` bounds the depth too)."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            children: list[tuple[object, str]] = []
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return where.encode("utf-8", "backslashreplace").decode("utf-8")
                children.append((child, where))
            stack.extend(reversed(children))
    return None
