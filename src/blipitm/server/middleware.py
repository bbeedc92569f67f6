"""Pure ASGI middleware: request metrics, then auth and body limits before any body is read.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because the routes listen on ``receive``
for the client's disconnect, which ``BaseHTTPMiddleware`` would hide. Auth is checked before the
body is read, so an unauthenticated client cannot make the server buffer a large body; and a body
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
from blipitm.keys import KeyRecord
from blipitm.server.auth import Authenticator, needs_key
from blipitm.server.errors import envelope
from blipitm.server.keys import SCOPE_KEY, Charge, LimiterUnavailable
from blipitm.server.limits import concurrency_refusal, refusal_headers
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
    code: str,
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


def _header(scope: Scope, name: bytes) -> str | None:
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


UNMETERED = "/v1/usage"
# The ASGI scope extension by which the connection layer (http.py) learns that a request's key was
# valid: ``{"callback": f}``; such a connection is never displaced at the connection cap.
KEY_ACCEPTED = "blipitm.key_accepted"


def _key_accepted(scope: Scope) -> None:
    callback = scope.get("extensions", {}).get(KEY_ACCEPTED, {}).get("callback")
    if callback is not None:
        callback()


class GuardMiddleware:
    """Auth for /v1, /v2 (and /metrics if protected); a metered key's admission, rate-limit
    headers and settlement; JSON content type and body-size limits."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Authenticator,
        protect_metrics: bool,
        max_body_bytes: int,
        max_items: int,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes
        self.max_items = max_items
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not (self.keys.enabled and needs_key(scope["path"], self.protect_metrics)):
            await self._checked(scope, receive, send)
            return
        key = self.keys.authenticate(_header(scope, b"authorization"))
        if isinstance(key, str):
            await send_error(send, 401, key, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        _key_accepted(scope)
        if isinstance(key, KeyRecord):
            await self._metered(key, scope, receive, send)
        else:  # an operator key
            await self._checked(scope, receive, send)

    async def _metered(self, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        """A store key's request: admitted (rate, concurrency), run with its ``x-ratelimit-*``
        headers, then settled by its status (no status: the client left, 499, refunded)."""
        assert self.keys.service is not None
        charge = self.keys.service.open(key, route_label(self.routes, scope))
        if charge.endpoint == UNMETERED:  # a key may always ask what it has left, within reason
            await self._usage(charge, scope, receive, send)
            return
        try:
            verdict = await charge.admit()
        except LimiterUnavailable as e:
            await send_error(send, 503, str(e), "limiter_unavailable", {"Retry-After": "5"})
            return
        if not verdict.allowed:
            headers = {**charge.headers, **refusal_headers(verdict)}
            await send_error(send, 429, verdict.message, str(verdict.refusal), headers)
            return
        scope[SCOPE_KEY] = charge
        status = CLIENT_CLOSED

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), *_raw(charge)]
            await send(message)

        try:
            await self._checked(scope, receive, send_with_headers)
        except Exception:  # becomes a 500 outside this middleware
            status = 500
            raise
        finally:
            await _settle(charge, status)

    async def _usage(self, charge: Charge, scope: Scope, receive: Receive, send: Send) -> None:
        """``/v1/usage``: no rate token or model slot, but at most ``--concurrency`` at once."""
        assert self.keys.service is not None
        with self.keys.service.usage_slot(charge.key) as allowed:
            if not allowed:
                assert charge.key.concurrency is not None
                message = concurrency_refusal(charge.key, charge.key.concurrency)
                retry = {"Retry-After": "1", "retry-after-ms": "1000"}
                await send_error(send, 429, message, "rate_limit_exceeded", retry)
                return
            scope[SCOPE_KEY] = charge
            await self._checked(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    def _refused_headers(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, message, code) when Content-Type or a declared length refuses the request."""
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return (
                415,
                f"Content-Type must be application/json, got {content_type or 'none'!r}",
                "unsupported_media_type",
            )
        declared = _header(scope, b"content-length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            return 413, self._too_large, "request_too_large"
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
                await send_error(send, 413, self._too_large, "request_too_large")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _raw(charge: Charge) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in charge.headers.items()]


async def _settle(charge: Charge, status: int) -> None:
    try:
        await charge.finish(status)
    except LimiterUnavailable as e:  # the slot and reservation expire in Redis by themselves
        log.error("could not settle a request of key %r: %s", charge.key.name, e)


# A lone surrogate reaches a JSON body only as a \uD800-\uDFFF escape: raw surrogate bytes are not
# UTF-8 and fail parsing. So only a body holding such an escape is parsed a second time here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_problem(body: bytes) -> tuple[str, str, str | None] | None:
    """(message, code, param) of the 400 for a body with a lone surrogate, or nested too deep to
    scan for one; None if it has neither."""
    try:
        param = lone_surrogate_param(body)
    except JSONDepthError as e:
        return f"the request body is not valid: {e}", "invalid_json", None
    if param is None:
        return None
    return (
        f"{param or 'the body'} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
        "which is not Unicode text; send valid UTF-8",
        "invalid_unicode",
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
