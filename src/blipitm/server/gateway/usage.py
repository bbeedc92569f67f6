"""``/v1/usage``: the calling key's limits, what remains of them, and its usage by day.

The report is :meth:`Gateway.usage_report`; the route checks the caller and ``since`` and renders
it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from blipitm.keys import parse_date
from blipitm.keys.store import day_of
from blipitm.server.errors import APIError, ErrorCode, error_responses
from blipitm.server.gateway.accounts import Charge, charge_of
from blipitm.server.schemas import KeyUsage

Report = Callable[[Charge, str | None], Awaitable[dict[str, Any]]]


DESCRIPTION = (
    "The calling key's limits, what remains, and its usage per day, endpoint and status.\n"
    "Calling it does not count against the key's limits; at most its `--concurrency` run at once."
)


def router_for(report: Report) -> APIRouter:
    """The route over ``report`` (:meth:`Gateway.usage_report`)."""
    router = APIRouter()

    @router.get("/v1/usage", response_model=KeyUsage, responses=error_responses(400, 401, 429, 503))
    async def key_usage(
        request: Request,
        since: Annotated[str | None, Query(description="first day (YYYY-MM-DD) to report")] = None,
    ) -> JSONResponse:
        charge = charge_of(request.scope)
        if charge is None:
            raise APIError(
                400,
                "only keys of the key store (--keys-db) are metered; an --api-key operator key "
                "has no limits or usage here (the operator runs `blipitm keys usage`)",
                code=ErrorCode.NOT_A_METERED_KEY,
            )
        # A bad date is the InvalidInputError of `since`: a 400 (server/errors.py).
        first = None if since is None else day_of(parse_date(since, "since"))
        return JSONResponse(await report(charge, first))

    return router
