"""Operational endpoints: liveness, readiness, Prometheus metrics. Open unless configured."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from blipitm.server.errors import ErrorCode, envelope
from blipitm.server.schemas import ErrorResponse, Status
from blipitm.server.state import ServerState

router = APIRouter()


@router.get("/health", response_model=Status)
async def health() -> JSONResponse:
    """Liveness: the process serves HTTP (the model may still be loading)."""
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    response_model=Status,
    responses={503: {"model": ErrorResponse, "description": "loading or failed"}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: the default model is loaded and a real forward pass has run on its worker
    (other models may still be loading, or load on demand: ``/v1/models`` shows each)."""
    state: ServerState = request.app.state.blipitm
    if state.ready:
        return JSONResponse({"status": "ready"})
    if state.load_error is not None and state.settings.expose_paths:
        message = f"the model failed to load: {state.load_error}"
    elif state.load_error is not None:
        # The error names files on the server; the operator has it in the log.
        message = "the model failed to load; the server log says why"
    else:
        message = "the model is loading"
    return JSONResponse(
        envelope(503, message, ErrorCode.MODEL_NOT_READY),
        status_code=503,
        headers={"Retry-After": "5"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        401: {"model": ErrorResponse, "description": "with --protect-metrics, a missing key"},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format; every metric is named ``blipitm_*``."""
    state: ServerState = request.app.state.blipitm
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
