"""Errors in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through here, including FastAPI's own validation errors and
unexpected exceptions, so stock SDKs always find the shape they parse. ``code`` is always a string
(OpenAI's SDKs type it so), one of :class:`ErrorCode`; ``param`` names the offending item, e.g.
``input[3]``.

Domain exceptions (an input the engine refuses, a full queue, a key over its limits, an unreachable
limiter) are translated in one place, :data:`TRANSLATIONS`: the exception handlers and the
middleware both use :func:`translate`, so no route catches them to re-raise them as HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blipitm.engine.batcher import QueueFull
from blipitm.errors import ImageTooLargeError, InvalidInputError, format_loc
from blipitm.server.account import LimiterUnavailable
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


class ErrorCode(StrEnum):
    """Every ``error.code`` the server answers, with the status it comes with (the OpenAPI
    descriptions list each status's codes from here)."""

    def __new__(cls, value: str, status: int) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        return member

    status: int

    INVALID_INPUT = "invalid_input", 400
    INVALID_IMAGE = "invalid_image", 400
    INVALID_URL = "invalid_url", 400
    INVALID_JSON = "invalid_json", 400
    INVALID_UNICODE = "invalid_unicode", 400
    INVALID_PAIRING = "invalid_pairing", 400
    UNSUPPORTED_INPUT = "unsupported_input", 400
    UNSUPPORTED_DIMENSIONS = "unsupported_dimensions", 400
    UNSUPPORTED_MODEL = "unsupported_model", 400
    URL_FORBIDDEN = "url_forbidden", 400
    URL_FETCH_FAILED = "url_fetch_failed", 400
    URL_FETCH_DISABLED = "url_fetch_disabled", 400
    URL_SCHEME_NOT_ALLOWED = "url_scheme_not_allowed", 400
    URL_TOO_MANY_REDIRECTS = "url_too_many_redirects", 400
    NOT_A_METERED_KEY = "not_a_metered_key", 400
    INVALID_API_KEY = "invalid_api_key", 401
    MODEL_NOT_ALLOWED = "model_not_allowed", 403
    MODEL_NOT_FOUND = "model_not_found", 404
    INDEX_NOT_CONFIGURED = "index_not_configured", 404
    NOT_FOUND = "not_found", 404
    BATCH_API_DISABLED = "batch_api_disabled", 404
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    REQUEST_TIMEOUT = "request_timeout", 408
    CONFLICT = "conflict", 409
    TOO_MANY_ITEMS = "too_many_items", 413
    IMAGE_TOO_LARGE = "image_too_large", 413
    REQUEST_TOO_LARGE = "request_too_large", 413
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415
    INVALID_REQUEST = "invalid_request", 422
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded", 429
    INSUFFICIENT_QUOTA = "insufficient_quota", 429
    QUEUE_FULL = "queue_full", 429
    CLIENT_CLOSED_REQUEST = "client_closed_request", 499
    INTERNAL_ERROR = "internal_error", 500
    HTTP_ERROR = "http_error", 500
    MODEL_NOT_READY = "model_not_ready", 503
    MODEL_UNAVAILABLE = "model_unavailable", 503
    LIMITER_UNAVAILABLE = "limiter_unavailable", 503
    INDEX_DAMAGED = "index_damaged", 503
    SHUTTING_DOWN = "shutting_down", 503
    TOO_MANY_CONNECTIONS = "too_many_connections", 503
    TIMEOUT = "timeout", 504


_BY_VALUE = {c.value: c for c in ErrorCode}


def as_code(value: ErrorCode | str) -> ErrorCode:
    """The :class:`ErrorCode` of ``value`` (a limiter's refusal arrives as its string)."""
    if isinstance(value, ErrorCode):
        return value
    try:
        return _BY_VALUE[value]
    except KeyError:
        raise ValueError(f"{value!r} is not an ErrorCode") from None


class APIError(Exception):
    """An error response; raise it from anywhere under a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: ErrorCode | str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = as_code(code)  # a code that is not an ErrorCode fails here, in the tests
        self.param = param
        self.headers = dict(headers or {})


class OverLimit(APIError):
    """A key's limit or credits refuse the request: 429 with its ``code`` (``rate_limit_exceeded``
    or ``insufficient_quota``) and ``Retry-After`` headers."""

    def __init__(self, message: str, code: ErrorCode | str, headers: Mapping[str, str]) -> None:
        super().__init__(as_code(code).status, message, code=code, headers=headers)


_DESCRIPTIONS = {
    400: "invalid input (the `param` names the item)",
    401: "missing or invalid API key",
    403: "this API key may not use the served model",
    404: "unknown model, or no such file or batch",
    409: "the batch is not running",
    413: "request, item count or image over a limit",
    415: "not JSON, or not an image media type",
    422: "request does not match the schema",
    429: "inference queue full, or over an API key's limits or credits (see Retry-After)",
    503: "model not loaded yet, or it failed to load",
    504: "request deadline passed",
}


def _description(status: int) -> str:
    codes = ", ".join(f"`{c}`" for c in ErrorCode if c.status == status)
    return f"{_DESCRIPTIONS[status]}; `code`: {codes}"


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route's OpenAPI entry: these statuses, in the error envelope, each
    described with the :class:`ErrorCode` values it may carry."""
    return {c: {"model": ErrorResponse, "description": _description(c)} for c in codes}


# What every model route may answer besides 200.
API_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 503, 504)


def envelope(
    status: int, message: str, code: ErrorCode | str, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": str(code),
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        envelope(err.status, err.message, err.code, err.param),
        status_code=err.status,
        headers=err.headers,
    )


@dataclass(frozen=True)
class Translation:
    """How one domain exception is answered: its code (whose status it takes), its message,
    its ``param`` and its headers, each read from the exception."""

    code: Callable[[Any], ErrorCode | str]
    message: Callable[[Any], str] = str
    param: Callable[[Any], str | None] = lambda _: None
    headers: Callable[[Any], Mapping[str, str]] = lambda _: {}


# Domain exception -> its answer; the first entry the exception is an instance of applies.
TRANSLATIONS: tuple[tuple[type[Exception], Translation], ...] = (
    (
        ImageTooLargeError,  # an image over the pixel limit
        Translation(lambda _: ErrorCode.IMAGE_TOO_LARGE, lambda e: e.reason, lambda e: e.field),
    ),
    (
        InvalidInputError,  # any other input the engine or processing refuses
        Translation(lambda _: ErrorCode.INVALID_INPUT, lambda e: e.reason, lambda e: e.field),
    ),
    (
        QueueFull,
        Translation(
            lambda _: ErrorCode.QUEUE_FULL,
            lambda _: "the server is busy (inference queue full); retry later",
            headers=lambda e: {"Retry-After": str(e.retry_after_s)},
        ),
    ),
    (
        LimiterUnavailable,
        Translation(
            lambda _: ErrorCode.LIMITER_UNAVAILABLE, headers=lambda _: {"Retry-After": "5"}
        ),
    ),
)


def _status(code: ErrorCode | str) -> int:
    return as_code(code).status


def translate(exc: Exception) -> APIError:
    """The answer to a domain exception of :data:`TRANSLATIONS` (an :class:`APIError` as is)."""
    if isinstance(exc, APIError):
        return exc
    for kind, how in TRANSLATIONS:
        if isinstance(exc, kind):
            code = how.code(exc)
            return APIError(
                _status(code),
                how.message(exc),
                code=code,
                param=how.param(exc),
                headers=how.headers(exc),
            )
    raise TypeError(f"no translation for {type(exc).__name__}") from exc


def from_invalid_input(e: InvalidInputError) -> APIError:
    """An engine / processing input error as a 400 (413 for an image over the pixel limit)."""
    return translate(e)


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
            return APIError(413, str(error.get("msg")), code=ErrorCode.TOO_MANY_ITEMS, param=param)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        param, msg = None, "the request body is not valid JSON"
    elif first.get("type") == "missing":
        msg = "this field is required"
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = f"{param}: {msg}{extra}" if param else f"{msg}{extra}"
    return APIError(422, text, code=ErrorCode.INVALID_REQUEST, param=param)


def install(app: FastAPI) -> None:
    """Route every kind of failure into the envelope."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_domain_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(translate(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_errors(exc.errors()))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
        return error_response(
            APIError(
                exc.status_code,
                str(exc.detail),
                code=codes.get(exc.status_code, ErrorCode.HTTP_ERROR),
                headers=dict(exc.headers or {}),
            )
        )

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with the traceback for the operator; the client learns nothing internal.
        log.error("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", code=ErrorCode.INTERNAL_ERROR))

    app.add_exception_handler(APIError, on_api_error)
    for kind, _ in TRANSLATIONS:
        app.add_exception_handler(kind, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
