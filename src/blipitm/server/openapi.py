"""The OpenAPI document: bearer auth declared on the API routes, and a stable JSON rendering.

``python -m blipitm.server.openapi > docs/openapi.json`` regenerates the committed copy; a test
checks that the committed copy is current.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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


def render(app: FastAPI) -> str:
    """Sorted keys and a trailing newline, so regenerating it gives byte-identical output."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    from blipitm.server.app import create_app
    from blipitm.server.settings import ServerSettings

    sys.stdout.write(render(create_app(ServerSettings())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
