"""Pure ASGI middleware: request metrics, then auth and body limits before any body is read.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because the routes listen on ``receive``
for the client's disconnect, which ``BaseHTTPMiddleware`` would hide. Auth is checked before the
body is read, so an unauthenticated client cannot make the server buffer a large body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from blipitm.server.auth import KeyChecker, needs_key
from blipitm.server.errors import envelope
from blipitm.server.metrics import Metrics

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
) -> None:
    body = json.dumps(envelope(status, message, code)).encode()
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


class MetricsMiddleware:
    """Counts every response by route and status, and times it."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Label by known route only: raw paths would let clients create unbounded label sets.
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)


class GuardMiddleware:
    """Auth for /v1, /v2 (and /metrics if protected); JSON content type and body-size limits."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyChecker,
        protect_metrics: bool,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (
            self.keys.enabled
            and needs_key(path, self.protect_metrics)
            and not self.keys.check(_header(scope, b"authorization"))
        ):
            await send_error(
                send,
                401,
                "missing or invalid API key; send `Authorization: Bearer <key>`",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            await send_error(
                send,
                415,
                f"Content-Type must be application/json, got {content_type or 'none'!r}",
                "unsupported_media_type",
            )
            return
        declared = _header(scope, b"content-length")
        too_large = f"request body is larger than the limit of {self.max_body_bytes} bytes"
        if declared and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            await send_error(send, 413, too_large, "request_too_large")
            return
        # Read the body under the cap (chunked uploads have no Content-Length), then replay it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, 413, too_large, "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the real channel (disconnect notice)

        await self.app(scope, replay, send)
