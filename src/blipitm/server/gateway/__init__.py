"""The hosted-API gateway: API keys, per-key limits and credits, metering, and ``/v1/usage``.

One unit on top of the request path, installed by one line of ``server/app.py``: it authenticates
(``auth.py``: a typed verdict), admits and settles a metered key's requests in its middleware
(``middleware.py``), keeps the keys, limiter and usage buffer (``accounts.py``, ``limits.py``,
``redis_limits.py``, ``metering.py``), and serves the usage report (``usage.py``). The request path
sees only the :class:`~blipitm.server.account.Account` it leaves in the scope; nothing outside this
package (but ``app.py``'s line and the CLI's keys/serve wiring) imports it
(``tests/test_layering.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute

from blipitm.keys import UsageRow
from blipitm.keys.store import Slot
from blipitm.server.gateway import usage
from blipitm.server.gateway.accounts import Charge, KeyService
from blipitm.server.gateway.auth import Authenticator, KeyChecker
from blipitm.server.gateway.limits import Window
from blipitm.server.gateway.middleware import GatewayMiddleware
from blipitm.server.settings import ServerSettings


class Gateway:
    """Built from the settings; the app adds its routers and middleware and starts and stops it
    around serving (the keys load and Redis is reached before the first request)."""

    def __init__(self, settings: ServerSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._models = settings.models()  # their names and prices
        # The store is opened here, so a bad --keys-db fails before serving.
        self.service = None if settings.keys_db is None else KeyService(settings, registry)
        self.keys = Authenticator(KeyChecker(settings.api_keys), self.service)
        self.routers: Sequence[APIRouter] = [usage.router_for(self.usage_report)]

    def add_middleware(self, app: FastAPI, routes: Sequence[BaseRoute]) -> None:
        app.add_middleware(
            GatewayMiddleware,
            keys=self.keys,
            protect_metrics=self.settings.protect_metrics,
            routes=routes,
        )

    async def start(self) -> None:
        if self.service is not None:
            await self.service.start()

    async def drain(self) -> None:
        return None  # its work ends with the requests'

    async def stop(self) -> None:
        """After the drain: the last usage reaches the store."""
        if self.service is not None:
            await self.service.stop()

    async def usage_report(self, charge: Charge, first: str | None) -> dict[str, Any]:
        """What ``GET /v1/usage`` answers a metered key: its limits, what remains of them, and
        its usage per day, endpoint and status (from day ``first``). Raises
        :class:`~blipitm.server.account.LimiterUnavailable`."""
        service = charge.service
        key = service.current(charge.key.name) or charge.key
        state = await service.limiter.state(key)
        rows = _merge(await service.buffer.usage(key.name, first), first)
        record = key.as_dict()
        return {
            "object": "key_usage",
            "name": key.name,
            "created": record["created"],
            "expires": record["expires"],
            "models": list(key.models) if key.models is not None else None,
            "limits": {
                "requests_per_minute": key.rpm,
                "items_per_minute": key.items_per_minute,
                "concurrency": key.concurrency,
                "credits": key.credit_limit,
                "image_credits": service.image_credits,
                "window_s": service.limiter_window_s,
            },
            "remaining": {
                "requests": _window(state.requests),
                "items": _window(state.items),
                "concurrency": None if key.concurrency is None else key.concurrency - state.active,
                "credits": state.credits_remaining,
            },
            # Credits per text and per image of each model the key may use (the models file
            # sets them per model; --image-credits is the default).
            "prices": {
                spec.name: {"text": spec.price.text, "image": spec.price.image}
                for spec in self._models
                if key.allows_model(*spec.names)
            },
            "data": [row.as_dict() | {"object": "usage"} for row in rows],
        }


def _window(w: Window | None) -> dict[str, Any] | None:
    return (
        None
        if w is None
        else {"limit": w.limit, "remaining": max(w.remaining, 0), "reset_s": w.reset_s}
    )


def _merge(rows: list[UsageRow], first: str | None) -> list[UsageRow]:
    merged: dict[Slot, UsageRow] = {}
    for row in rows:
        if first is not None and row.day < first:
            continue
        old = merged.get(row.slot)
        merged[row.slot] = row if old is None else old + row
    return sorted(merged.values(), key=lambda r: (r.day, r.endpoint, r.status))


__all__ = ["Gateway"]
