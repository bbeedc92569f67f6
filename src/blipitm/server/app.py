"""The FastAPI app factory: ``create_app(settings)``.

Loading happens in the background after startup, so ``/health`` answers at once and ``/ready``
turns 200 only once the model is loaded and a real forward pass has run on the inference worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute, Route

from blipitm.common.memory import apply_memory_policy
from blipitm.common.version import __version__
from blipitm.engine.options import LoadOptions
from blipitm.errors import BlipitmError
from blipitm.server import docs, errors
from blipitm.server.metrics import Metrics
from blipitm.server.middleware import GuardMiddleware, MetricsMiddleware
from blipitm.server.routes import (
    chat,
    embed_v2,
    embeddings,
    explain,
    models,
    multimodal,
    ops,
    playground,
    rerank,
    score,
    search,
)
from blipitm.server.settings import ServerSettings
from blipitm.server.state import EngineFactory, ServerState

if TYPE_CHECKING:
    from blipitm.engine import Captioner, Engine

log = logging.getLogger("blipitm.server")

DESCRIPTION = (
    "BLIP image-text matching behind OpenAI (embeddings), Cohere (embed v2), Voyage (multimodal "
    "embeddings), vLLM (score) and Cohere/Jina (rerank) compatible endpoints. Errors use OpenAI's "
    "envelope."
)


def load_engine(options: LoadOptions) -> Engine | Captioner:
    """The default engine factory: what the checkpoint holds (a matching model or a captioner)
    and its input limits."""
    from blipitm.engine import load_any  # torch: when the app loads the model, not before

    return load_any(options)


class Extension(Protocol):
    """A unit on top of the request path (the hosted-API gateway): its routes, its middleware
    (between the metrics and the body guards), and what it starts and stops around serving."""

    routers: Sequence[APIRouter]

    def add_middleware(self, app: FastAPI, routes: Sequence[BaseRoute]) -> None: ...
    async def start(self) -> None: ...
    async def drain(self) -> None:
        """Stop its own work that needs the models (before they close)."""

    async def stop(self) -> None:
        """After the models have closed (the last usage reaches the store)."""


Extensions = Callable[[ServerSettings, Metrics], Sequence[Extension]]


def hosted_api(settings: ServerSettings, metrics: Metrics) -> Sequence[Extension]:
    """The default: API keys, limits, credits, metering and ``/v1/usage``, and OpenAI's Batch API
    (on with ``--batch-dir``). Without them (``create_app(..., extensions=no_extensions)``) every
    model route is served, open."""
    from blipitm.server.batch import BatchAPI
    from blipitm.server.gateway import Gateway  # the one line that installs the gateway

    return [Gateway(settings, metrics.registry), BatchAPI(settings)]


def no_extensions(settings: ServerSettings, metrics: Metrics) -> Sequence[Extension]:
    return []


async def _start(
    extensions: Sequence[Extension], on_failure: Callable[[BaseException], None] | None
) -> None:
    """Load the keys and reach Redis before serving; a failure stops the server (the CLI says
    why in one line)."""
    for extension in extensions:
        try:
            await extension.start()
        except BlipitmError as e:
            if on_failure is not None:
                on_failure(e)
            raise


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory = load_engine,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
    extensions: Extensions = hosted_api,
) -> FastAPI:
    """Build the app. ``on_load_failure`` lets the CLI stop the server if the default model
    cannot load (another model's failure is its own: it answers 503 for that model only)."""
    state = ServerState(settings, Metrics())
    installed = extensions(settings, state.metrics)

    async def load_in_background() -> None:
        assert state.models is not None, "opened in the lifespan"
        try:
            await state.models.preload()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if on_load_failure is not None:
                on_load_failure(e)  # the caller reports it (the CLI: one line, then it exits)
            else:
                # Our own errors say what is wrong (model or index); anything else is a bug.
                log.error(
                    "cannot serve: the default model failed to load: %s",
                    state.load_error,
                    exc_info=None if isinstance(e, BlipitmError) else e,
                )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _start(installed, on_load_failure)
        apply_memory_policy()  # so that --max-decoded-pixels bounds the resident memory
        state.open(engine_factory)
        task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for extension in installed:
                await extension.drain()
            await state.close()
            for extension in installed:  # after the drain: the last usage reaches the store
                await extension.stop()

    app = FastAPI(
        title="blipitm",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by blipitm.server.docs, without a CDN
        redoc_url=None,
    )
    app.state.blipitm = state
    errors.install(app)
    modules = (ops, models, embeddings, embed_v2, multimodal, score, rerank, search, chat)
    routers = [r.router for r in modules]
    routers += [router for extension in installed for router in extension.routers]
    routers += [r.router for r in (explain, playground, docs)]
    for router in routers:
        app.include_router(router)
    # The routes themselves, not app.routes: FastAPI keeps an included router there as one entry.
    own = [r for r in app.routes if isinstance(r, Route)]  # /openapi.json
    routes = [*own, *(r for router in routers for r in router.routes)]
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_items=settings.max_items,
        routes=routes,
    )
    for extension in installed:  # outside the body guards: a key is checked before the body
        extension.add_middleware(app, routes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=routes)
    docs.customise_openapi(app)
    return app
