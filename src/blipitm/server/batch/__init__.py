"""OpenAI's Batch API: files of requests in, files of answers out, run in the server's idle time.

Installed like the gateway, as an extension of the app (``server/app.py``); on with
``--batch-dir DIR`` (where files and batches are kept: ``store.py``), off otherwise (its routes
then say how to turn it on). The lines run through the app itself (``lines.py``), as background
work billed to the batch's owner at ``--batch-credit-factor`` of the online price
(``runner.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

from blipitm.server.batch.routes import router_for
from blipitm.server.batch.runner import BatchRunner
from blipitm.server.batch.store import BatchStore
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.settings import ServerSettings

UPLOAD_PATH = "/v1/files"  # streamed by its route, not read whole by the body guards


class BatchAPI:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.store: BatchStore | None = None
        self.runner: BatchRunner | None = None
        if settings.batch_dir is None:
            self.routers: Sequence[APIRouter] = [_disabled()]
            return
        self.store = BatchStore(settings.batch_dir)
        self.runner = BatchRunner(
            self.store, window=settings.batch_window, credit_factor=settings.batch_credit_factor
        )
        self.routers = [router_for(self.store, self.runner, settings)]

    def add_middleware(self, app: FastAPI, routes: Sequence[BaseRoute]) -> None:
        if self.runner is not None:
            # The lines go through the whole app, middleware included, once it serves.
            state = app.state.blipitm
            self.runner.attach(app, lambda: state.ready)

    async def start(self) -> None:
        if self.runner is not None:
            self.runner.start()  # resumes every unfinished batch

    async def drain(self) -> None:
        """Stop sending lines before the models close; lines in flight are cancelled, not
        answered, so a restarted server runs them again."""
        if self.runner is not None:
            await self.runner.stop()

    async def stop(self) -> None:
        if self.store is not None:
            self.store.close()


def _disabled() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/v1/files{rest:path}", methods=["GET", "POST", "DELETE"])
    @router.api_route("/v1/batches{rest:path}", methods=["GET", "POST"])
    async def disabled(rest: str) -> None:
        raise APIError(
            404,
            "the Batch API is off on this server; start it with --batch-dir DIR (where its "
            "files and batches are kept)",
            code=ErrorCode.BATCH_API_DISABLED,
        )

    return router
