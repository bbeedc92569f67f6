"""Errors in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through here, including FastAPI's own validation errors and
unexpected exceptions, so stock SDKs always find the shape they parse. ``code`` is always a string
(OpenAI's SDKs type it so); ``param`` names the offending item, e.g. ``input[3]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blipitm.errors import ImageTooLargeError, InvalidInputError, format_loc
from blipitm.server.schemas import TOO_MANY_ITEMS, ErrorResponse

log = logging.getLogger("blipitm.server")

# HTTP status -> OpenAI error ``type``.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error response; raise it from anywhere under a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


_DESCRIPTIONS = {
    400: "invalid input (the `param` names the item)",
    401: "missing or invalid API key",
    403: "this API key may not use the served model",
    404: "unknown model",
    413: "request, item count or image over a limit",
    415: "not JSON, or not an image media type",
    422: "request does not match the schema",
    429: "inference queue full, or over an API key's limits or credits (see Retry-After)",
    503: "model not loaded yet",
    504: "request deadline passed",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route's OpenAPI entry: these codes, in the error envelope."""
    return {c: {"model": ErrorResponse, "description": _DESCRIPTIONS[c]} for c in codes}


# What every model route may answer besides 200.
API_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 503, 504)


def envelope(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        envelope(err.status, err.message, err.code, err.param),
        status_code=err.status,
        headers=err.headers,
    )


def from_invalid_input(e: InvalidInputError) -> APIError:
    """An engine / processing input error as a 400 (413 for an image over the pixel limit)."""
    if isinstance(e, ImageTooLargeError):
        return APIError(413, e.reason, code="image_too_large", param=e.field)
    return APIError(400, e.reason, code="invalid_input", param=e.field)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """FastAPI's ``("body", "input", 3)`` -> ``input[3]``."""
    parts = [p for p in loc if p != "body"]
    # pydantic's union-branch labels (after the first part) are not fields the client wrote; a
    # model branch is labelled with its class name ("Content"), and no request field is Capitalised.
    labels = ("str", "list[", "function-", "tagged-union", "constrained")
    branch = [isinstance(p, str) and (p.startswith(labels) or p[:1].isupper()) for p in parts]
    kept = parts[:1] + [p for p, skip in zip(parts[1:], branch[1:], strict=True) if not skip]
    return format_loc(tuple(kept)) or None


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> APIError:
    """One error for a request that failed validation: a list over ``--max-items`` is the 413 the
    routes' own count check gives; else a 422 naming the first problem and how many others.

    The message never lists every problem: its size stays independent of the request's."""
    for error in errors:
        if error.get("type") == TOO_MANY_ITEMS:
            param = _loc_to_param(tuple(error.get("loc", ())))
            return APIError(413, str(error.get("msg")), code="too_many_items", param=param)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        param, msg = None, "the request body is not valid JSON"
    elif first.get("type") == "missing":
        msg = "this field is required"
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = f"{param}: {msg}{extra}" if param else f"{msg}{extra}"
    return APIError(422, text, code="invalid_request", param=param)


def install(app: FastAPI) -> None:
    """Route every kind of failure into the envelope."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_invalid_input(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidInputError)
        return error_response(from_invalid_input(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_errors(exc.errors()))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            APIError(
                exc.status_code,
                str(exc.detail),
                code=codes.get(exc.status_code, "http_error"),
                headers=dict(exc.headers or {}),
            )
        )

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with the traceback for the operator; the client learns nothing internal.
        log.error("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidInputError, on_invalid_input)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
