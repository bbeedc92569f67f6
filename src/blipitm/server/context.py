"""What every model route starts from: one FastAPI dependency that yields a request context.

``Annotated[RequestContext[Body], ready(Body)]`` parses the body (422), checks the model name
(404), that the caller's account may use it (404 / 403) and that the model is loaded (503), in
that order, and starts the request's deadline. The route then checks its own parameters and calls
:meth:`RequestContext.inputs` (queue room, credits, texts, images), :meth:`RequestContext.run` and
:meth:`RequestContext.usage_tokens`.

The account (``server/account.py``) is resolved once, here: a metered key's, or the unmetered one
of operator keys and open servers, so nothing below asks whether the request is billed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from fastapi import Depends, Request

from blipitm.engine.batcher import Batcher, Job, LocMap, QueueFull
from blipitm.processing import ResizedImage, validate_text
from blipitm.server.account import UNMETERED, Account, account_of
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.images import ImageLoader
from blipitm.server.inputs import ImageItem, TextItem
from blipitm.server.state import ServerState

if TYPE_CHECKING:
    from blipitm.engine import Engine  # torch: loaded when the app loads a model, not on import


class NamesModel(Protocol):
    """A request body with OpenAI's optional ``model`` field."""

    @property
    def model(self) -> str | None: ...


B = TypeVar("B", bound=NamesModel)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blipitm
    return state


@dataclass(frozen=True)
class RequestContext(Generic[B]):
    """One request against the loaded model, and the account it is billed to."""

    body: B
    request: Request
    state: ServerState
    engine: Engine
    batcher: Batcher
    loader: ImageLoader
    deadline: float  # on the event loop's clock
    account: Account = UNMETERED

    @classmethod
    def start(cls, body: B, request: Request) -> RequestContext[B]:
        state = server_state(request)
        state.check_model(body.model)
        account = account_of(request.scope)
        check_access(account, state, body.model)
        loaded = state.require_ready()
        deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
        return cls(
            body, request, state, loaded.engine, loaded.batcher, loaded.loader, deadline, account
        )

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
                code=ErrorCode.TOO_MANY_ITEMS,
                param=images[limit].param,
            )
        if not self.batcher.has_room():
            self.state.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(self.batcher.retry_after_s())
        # The items and credits the request declares (settled when the response is complete).
        await self.account.reserve(len(texts), len(images))
        return self._validate_texts(texts), await self._load_images(images)

    def _validate_texts(self, items: Sequence[TextItem]) -> list[str]:
        limit = self.engine.max_text_chars  # the engine's own limit: one home
        return [validate_text(item.text, loc=item.loc, max_chars=limit) for item in items]

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
        future = self.batcher.submit(job, locs)  # QueueFull: a 429 (server/errors.py)
        try:
            return await self._wait(future)
        finally:
            # cancel() fails for a job the worker has taken: that compute is spent, and billed
            # (unless the job itself failed: an input the model refused, a server error).
            if not future.cancel() and not (future.done() and future.exception() is not None):
                self.account.worked(texts, images)

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
            return result.result()  # an InvalidInputError: a 400 (server/errors.py)
        # Cancelling the future makes the worker skip the job if it has not started it yet.
        result.cancel()
        metrics = self.state.metrics
        if gone in done:
            metrics.rejected.labels(reason="client_disconnected").inc()
            raise APIError(499, "client closed the request", code=ErrorCode.CLIENT_CLOSED_REQUEST)
        metrics.rejected.labels(reason="timeout").inc()
        raise self._timeout()

    def _timeout(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.state.settings.request_timeout_s:g}s",
            code=ErrorCode.TIMEOUT,
        )

    def usage_tokens(self, text_tokens: int, n_images: int) -> int:
        """``usage``: the tokens the model read for the texts, as the engine's results count them
        (``text_tokens``: no second tokenization), plus the vision tokens (patches + CLS) each
        image becomes."""
        tokens = int(text_tokens) + n_images * self.engine.info.image_tokens
        self.account.bill(tokens)
        return tokens


def check_access(account: Account, state: ServerState, named: str | None) -> None:
    """OpenAI's answers: a model the key may not use 'does not exist' for it (404) when the
    request names it; with ``model`` omitted, the served model is refused (403)."""
    if account.allows(state.settings.model_name, state.settings.model):
        return
    if named is not None:
        raise APIError(
            404,
            f"the model {named!r} does not exist or this key does not have access to it",
            code=ErrorCode.MODEL_NOT_FOUND,
            param="model",
        )
    raise APIError(
        403, "this key may not use the model this server serves", code=ErrorCode.MODEL_NOT_ALLOWED
    )


def ready(body_type: type[B]) -> Any:
    """``Depends`` for a route whose body is ``body_type``: see the module docstring."""

    async def dependency(body: B, request: Request) -> RequestContext[B]:
        return RequestContext.start(body, request)

    # FastAPI reads the body's model from the signature; this route's model, not the TypeVar.
    dependency.__annotations__["body"] = body_type
    return Depends(dependency)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read; only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
