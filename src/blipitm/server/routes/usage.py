"""``/v1/usage``: the calling key's limits, what remains of them, and its usage by day."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from blipitm.errors import InvalidInputError
from blipitm.keys import UsageRow, parse_date
from blipitm.keys.store import day_of
from blipitm.server.context import server_state
from blipitm.server.errors import APIError, error_responses
from blipitm.server.keys import LimiterUnavailable, charge_of
from blipitm.server.limits import Window
from blipitm.server.schemas import KeyUsage

router = APIRouter()


def _window(w: Window | None) -> dict[str, Any] | None:
    return (
        None
        if w is None
        else {"limit": w.limit, "remaining": max(w.remaining, 0), "reset_s": w.reset_s}
    )


@router.get("/v1/usage", response_model=KeyUsage, responses=error_responses(400, 401, 429, 503))
async def key_usage(
    request: Request,
    since: Annotated[str | None, Query(description="first day (YYYY-MM-DD) to report")] = None,
) -> JSONResponse:
    """The calling key's limits, what remains, and its usage per day, endpoint and status.
    Calling it does not count against the key's limits; at most its `--concurrency` run at once."""
    charge = charge_of(request.scope)
    service = server_state(request).keys
    if charge is None or service is None:
        raise APIError(
            400,
            "only keys of the key store (--keys-db) are metered; an --api-key operator key has "
            "no limits or usage here (the operator runs `blipitm keys usage`)",
            code="not_a_metered_key",
        )
    first = None
    if since is not None:
        try:
            first = day_of(parse_date(since, "since"))
        except InvalidInputError as e:
            raise APIError(400, e.reason, code="invalid_input", param="since") from None
    key = service.current(charge.key.name) or charge.key
    try:
        state = await service.limiter.state(key)
    except LimiterUnavailable as e:
        raise APIError(503, str(e), code="limiter_unavailable") from None
    rows = _merge(await service.buffer.usage(key.name, first), first)
    return JSONResponse(
        {
            "object": "key_usage",
            "name": key.name,
            "created": key.as_dict()["created"],
            "expires": key.as_dict()["expires"],
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
            "data": [row.as_dict() | {"object": "usage"} for row in rows],
        }
    )


def _merge(rows: list[UsageRow], first: str | None) -> list[UsageRow]:
    merged: dict[tuple[str, str, str, int], UsageRow] = {}
    for row in rows:
        if first is not None and row.day < first:
            continue
        old = merged.get(row.slot)
        merged[row.slot] = row if old is None else old + row
    return sorted(merged.values(), key=lambda r: (r.day, r.endpoint, r.status))
