"""The API's documentation: the OpenAPI schema (bearer auth declared on the API routes) and
Swagger UI at ``/docs``, its assets served from the installed ``fastapi-swagger`` package.

FastAPI's stock page loads Swagger UI from a CDN, so it is blank on a machine without network (the
setting this server is built for). Here the page references only this server.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response

from blipitm.server.errors import APIError, ErrorCode

router = APIRouter(include_in_schema=False)

_ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


_SCHEME = "bearerAuth"


def customise_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})[_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "required on /v1 and /v2 when the server has API keys",
        }
        for path, operations in schema.get("paths", {}).items():
            if path.startswith(("/v1/", "/v2/")):
                for operation in operations.values():
                    operation["security"] = [{_SCHEME: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


@functools.cache
def _asset(name: str) -> bytes:
    return files("fastapi_swagger.resources").joinpath(name).read_bytes()


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="blipitm - Swagger UI",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        # Swagger UI's default sends the spec to validator.swagger.io for a badge: no outside hosts.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/assets/{name}")
async def swagger_asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no documentation asset {name!r}", code=ErrorCode.NOT_FOUND)
    return Response(
        _asset(name), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )
