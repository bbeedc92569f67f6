"""What every model route starts from: one FastAPI dependency that yields a ready request.

``Annotated[Ready[Body], ready(Body)]`` parses the body (422), checks the model name (404) and
that the model is loaded (503), in that order, and starts the request's deadline. The route then
checks its own parameters and calls :meth:`Ready.inputs` (queue room, texts, images),
:meth:`Ready.run` and :meth:`Ready.usage_tokens`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from fastapi import Depends, Request

from blipitm.engine import Engine
from blipitm.engine.batcher import Batcher, Job, LocMap, QueueFull
from blipitm.errors import InvalidInputError
from blipitm.processing import ResizedImage, validate_text
from blipitm.server.errors import APIError, from_invalid_input
from blipitm.server.images import ImageLoader
from blipitm.server.inputs import ImageItem, TextItem
from blipitm.server.keys import LimiterUnavailable, charge_of
from blipitm.server.state import ServerState


class NamesModel(Protocol):
    """A request body with OpenAI's optional ``model`` field."""

    @property
    def model(self) -> str | None: ...


B = TypeVar("B", bound=NamesModel)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blipitm
    return state


@dataclass(frozen=True)
class Ready(Generic[B]):
    """One request against the loaded model."""

    body: B
    request: Request
    state: ServerState
    engine: Engine
    batcher: Batcher
    loader: ImageLoader
    deadline: float  # on the event loop's clock

    @classmethod
    def start(cls, body: B, request: Request) -> Ready[B]:
        state = server_state(request)
        state.check_model(body.model)
        charge = charge_of(request.scope)
        if charge is not None:
            settings = state.settings
            charge.check_model(body.model, (settings.model_name, settings.model))
        loaded = state.require_ready()
        deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
        return cls(body, request, state, loaded.engine, loaded.batcher, loaded.loader, deadline)

    async def inputs(
        self, texts: Sequence[TextItem], images: Sequence[ImageItem]
    ) -> tuple[list[str], list[ResizedImage]]:
        """The request's texts, validated, and images, decoded and resized. Refuses first when
        the queue is already full, so that a busy server decodes nothing it cannot run."""
        limit = self.state.settings.max_images
        if len(images) > limit:  # what an image costs (memory, encoding time) is bounded here
            raise APIError(
                413,
                f"{len(images)} images in one request; the limit is {limit} (split the request)",
                code="too_many_items",
                param=images[limit].param,
            )
        if not self.batcher.has_room():
            self.state.metrics.rejected.labels(reason="queue_full").inc()
            raise _queue_full(self.batcher.retry_after_s())
        await self._reserve(len(texts), len(images))
        return self._validate_texts(texts), await self._load_images(images)

    async def _reserve(self, texts: int, images: int) -> None:
        """A metered key's items and credits, from what the request declares (settled by the
        guard middleware when the response is complete)."""
        charge = charge_of(self.request.scope)
        if charge is None:
            return
        try:
            await charge.reserve(texts, images)
        except LimiterUnavailable as e:
            raise APIError(503, str(e), code="limiter_unavailable") from None

    def _validate_texts(self, items: Sequence[TextItem]) -> list[str]:
        limit = self.engine.max_text_chars  # the engine's own limit: one home
        try:
            return [validate_text(item.text, loc=item.loc, max_chars=limit) for item in items]
        except InvalidInputError as e:
            raise from_invalid_input(e) from None

    async def _load_images(self, items: Sequence[ImageItem]) -> list[ResizedImage]:
        if not items:
            return []
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self.loader.load_all([i.source for i in items], [i.loc for i in items])
        except TimeoutError:
            raise self._timeout() from None
        finally:
            self.state.metrics.preprocess_duration.observe(time.perf_counter() - started)

    async def run(
        self, job: Job, locs: LocMap, *, texts: int | None = None, images: int | None = None
    ) -> Any:
        """Queue ``job`` and wait for it, the deadline, or the client going away. ``texts`` and
        ``images``: what of the request the job computes (None: all of it), billed to a metered
        key once the worker has taken the job, whether or not the client waits for the answer."""
        try:
            future = self.batcher.submit(job, locs)
        except QueueFull as e:
            raise _queue_full(e.retry_after_s) from None
        try:
            return await self._wait(future)
        finally:
            # cancel() fails for a job the worker has taken: that compute is spent, and billed
            # (unless the job itself failed: an input the model refused, a server error).
            if not future.cancel() and not (future.done() and future.exception() is not None):
                charge = charge_of(self.request.scope)
                if charge is not None:
                    charge.worked(texts, images)

    async def _wait(self, future: Future[Any]) -> Any:
        result = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(self.request))
        try:
            done, _ = await asyncio.wait(
                {result, gone},
                timeout=max(0.0, self.deadline - asyncio.get_running_loop().time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if result in done:
            try:
                return result.result()
            except InvalidInputError as e:
                raise from_invalid_input(e) from None
        # Cancelling the future makes the worker skip the job if it has not started it yet.
        result.cancel()
        metrics = self.state.metrics
        if gone in done:
            metrics.rejected.labels(reason="client_disconnected").inc()
            raise APIError(499, "client closed the request", code="client_closed_request")
        metrics.rejected.labels(reason="timeout").inc()
        raise self._timeout()

    def _timeout(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.state.settings.request_timeout_s:g}s",
            code="timeout",
        )

    def usage_tokens(self, text_tokens: int, n_images: int) -> int:
        """``usage``: the tokens the model read for the texts, as the engine's results count them
        (``text_tokens``: no second tokenization), plus the vision tokens (patches + CLS) each
        image becomes."""
        tokens = int(text_tokens) + n_images * self.engine.info.image_tokens
        charge = charge_of(self.request.scope)
        if charge is not None:
            charge.tokens = tokens  # metered with the request
        return tokens


def ready(body_type: type[B]) -> Any:
    """``Depends`` for a route whose body is ``body_type``: see the module docstring."""

    async def dependency(body: B, request: Request) -> Ready[B]:
        return Ready.start(body, request)

    # FastAPI reads the body's model from the signature; this route's model, not the TypeVar.
    dependency.__annotations__["body"] = body_type
    return Depends(dependency)


def _queue_full(retry_after_s: int) -> APIError:
    return APIError(
        429,
        "the server is busy (inference queue full); retry later",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read; only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
