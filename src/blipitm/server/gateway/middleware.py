"""The gateway's ASGI middleware: who is calling, and a metered key's admission and settlement.

It runs outside the body guards (``server/middleware.py``), so a key is checked from the headers
before a byte of the body is read. An operator key (or a server without keys) passes through
unmetered; a key of the store is admitted (rate, concurrency) before the body is read, its
``x-ratelimit-*`` headers are added to the response, and the request is settled by its status
(no status: the client left, 499, and only the work done is billed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute

from blipitm.server.account import (
    SCOPE_ACCOUNT,
    SCOPE_BATCH_CALLER,
    BatchCaller,
    LimiterUnavailable,
)
from blipitm.server.errors import ErrorCode, OverLimit, translate
from blipitm.server.gateway.accounts import Charge, KeyService
from blipitm.server.gateway.auth import Authenticator, needs_key
from blipitm.server.gateway.limits import concurrency_refusal, refusal_headers
from blipitm.server.gateway.verdict import Metered, Operator, Refused
from blipitm.server.middleware import (
    CLIENT_CLOSED,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header,
    key_accepted,
    route_label,
    send_api_error,
    send_error,
)

log = logging.getLogger("blipitm.server")

UNMETERED = "/v1/usage"


class GatewayMiddleware:
    """Auth for /v1, /v2 (and /metrics if protected); a metered key's admission, rate-limit
    headers and settlement."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Authenticator,
        protect_metrics: bool,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (
            self.keys.enabled and needs_key(scope["path"], self.protect_metrics)
        ):
            await self.app(scope, receive, send)
            return
        caller = scope.get(SCOPE_BATCH_CALLER)
        if isinstance(caller, BatchCaller):
            await self._batch_line(caller, scope, receive, send)
            return
        match self.keys.authenticate(header(scope, b"authorization")):
            case Refused(reason):
                headers = {"WWW-Authenticate": "Bearer"}
                await send_error(send, 401, reason, ErrorCode.INVALID_API_KEY, headers)
            case Metered(key):
                key_accepted(scope)
                assert self.keys.service is not None
                charge = self.keys.service.open(key, route_label(self.routes, scope))
                await self._metered(self.keys.service, charge, scope, receive, send)
            case Operator():
                key_accepted(scope)
                await self.app(scope, receive, send)

    async def _metered(
        self, service: KeyService, charge: Charge, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A store key's request: admitted, run with its ``x-ratelimit-*`` headers, settled."""
        if charge.endpoint == UNMETERED:  # a key may always ask what it has left, within reason
            await self._usage(service, charge, scope, receive, send)
            return
        try:
            verdict = await charge.admit()
        except LimiterUnavailable as e:
            await send_api_error(send, translate(e))
            return
        if not verdict.allowed:
            headers = {**charge.headers, **refusal_headers(verdict)}
            await send_api_error(send, OverLimit(verdict.message, str(verdict.refusal), headers))
            return
        scope[SCOPE_ACCOUNT] = charge
        status = CLIENT_CLOSED

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), *_raw(charge)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # becomes a 500 outside this middleware
            status = 500
            raise
        finally:
            await settle(charge, status)

    async def _batch_line(
        self, caller: BatchCaller, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A Batch API line, billed to the batch's owner at the batch price: credits are
        reserved and settled as for any request, but the key's rate and concurrency limits do
        not apply (the batch runner paces its lines). A key deleted or expired since the batch
        was created is refused, line by line."""
        if caller.owner is None:  # an operator's batch, or an open server's
            await self.app(scope, receive, send)
            return
        service = self.keys.service
        key = None if service is None else service.current(caller.owner)
        if service is None or key is None or key.refusal(time.time()) is not None:
            message = f"the key {caller.owner!r} that created this batch is no longer valid"
            await send_error(send, 401, message, ErrorCode.INVALID_API_KEY)
            return
        unlimited = dataclasses.replace(key, rpm=None, items_per_minute=None, concurrency=None)
        charge = service.open(unlimited, "batch:" + route_label(self.routes, scope))
        charge.factor = caller.credit_factor
        await self._metered(service, charge, scope, receive, send)

    async def _usage(
        self, service: KeyService, charge: Charge, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``/v1/usage``: no rate token or model slot, but at most ``--concurrency`` at once."""
        with service.usage_slot(charge.key) as allowed:
            if not allowed:
                assert charge.key.concurrency is not None
                message = concurrency_refusal(charge.key, charge.key.concurrency)
                retry = {"Retry-After": "1", "retry-after-ms": "1000"}
                await send_api_error(send, OverLimit(message, ErrorCode.RATE_LIMIT_EXCEEDED, retry))
                return
            scope[SCOPE_ACCOUNT] = charge
            await self.app(scope, receive, send)


def _raw(charge: Charge) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in charge.headers.items()]


async def settle(charge: Charge, status: int) -> None:
    try:
        await charge.finish(status)
    except LimiterUnavailable as e:  # the slot and reservation expire in Redis by themselves
        log.error("could not settle a request of key %r: %s", charge.key.name, e)
