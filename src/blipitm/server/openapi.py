"""The committed OpenAPI document: a stable JSON rendering of the app's schema.

``python -m blipitm.server.openapi > docs/openapi.json`` regenerates the committed copy; a test
checks that the committed copy is current. (The schema itself is customised in ``docs.py``.)
"""

from __future__ import annotations

import json
import sys

from fastapi import FastAPI

from blipitm.server.app import create_app
from blipitm.server.settings import ServerSettings


def render(app: FastAPI) -> str:
    """Sorted keys and a trailing newline, so regenerating it gives byte-identical output."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render(create_app(ServerSettings())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
