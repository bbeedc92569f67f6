"""What every model route starts from: one FastAPI dependency that yields a request context.

``Annotated[RequestContext[Body], ready(Body)]`` parses the body (422), resolves the model name
(404; omitted: the default model), checks that the caller's account may use it (404 / 403),
starts the request's deadline and holds the model loaded for the request (loading it if it is
not, within the deadline; 503 if it cannot load), in that order. The route then checks its own
parameters and calls :meth:`RequestContext.inputs` (queue room, credits, texts, images),
:meth:`RequestContext.run` and :meth:`RequestContext.usage_tokens`.

The account (``server/account.py``) is resolved once, here: a metered key's, or the unmetered one
of operator keys and open servers, so nothing below asks whether the request is billed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from fastapi import Depends, Request

from blipitm.config import Task
from blipitm.engine.batcher import Batcher, Job, LocMap, QueueFull
from blipitm.processing import ResizedImage, validate_text
from blipitm.server.account import SCOPE_BACKGROUND, UNMETERED, Account, account_of
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.images import ImageLoader
from blipitm.server.inputs import ImageItem, TextItem
from blipitm.server.registry import Loaded, ModelRegistry, ServedModel
from blipitm.server.state import ServerState

if TYPE_CHECKING:  # torch: loaded when the app loads a model, not on import
    from blipitm.engine import Captioner, Engine


class NamesModel(Protocol):
    """A request body with OpenAI's optional ``model`` field."""

    @property
    def model(self) -> str | None: ...


B = TypeVar("B", bound=NamesModel)

BATCH_LINE_TIMEOUT_S = 24 * 3600.0  # the completion window: a line never times out before it


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blipitm
    return state


@dataclass(frozen=True)
class RequestContext(Generic[B]):
    """One request against one loaded model, and the account it is billed to."""

    body: B
    request: Request
    state: ServerState
    model: ServedModel
    loaded: Loaded
    deadline: float  # on the event loop's clock
    account: Account = UNMETERED

    @property
    def model_name(self) -> str:
        """The served name of the request's model (responses' ``model``)."""
        return self.model.name

    @property
    def engine(self) -> Engine:
        """The matching engine (:func:`ready` let only a matching model reach an ITM route)."""
        return cast("Engine", self.loaded.engine)

    @property
    def captioner(self) -> Captioner:
        """The captioner (:func:`ready` let only a captioner reach a caption route)."""
        return cast("Captioner", self.loaded.engine)

    @property
    def batcher(self) -> Batcher:
        return self.loaded.batcher

    @property
    def loader(self) -> ImageLoader:
        return self.loaded.loader

    @property
    def background(self) -> bool:
        """A Batch API line: run when no online request waits (``engine/batcher.py``)."""
        return bool(self.request.scope.get(SCOPE_BACKGROUND))

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
        if not self.background and not self.batcher.has_room():
            self.state.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(self.batcher.retry_after_s())
        # The items and credits the request declares (settled when the response is complete).
        await self.account.reserve(len(texts), len(images), self.model.spec)
        return self._validate_texts(texts), await self._load_images(images)

    def _validate_texts(self, items: Sequence[TextItem]) -> list[str]:
        limit = self.loaded.engine.max_text_chars  # the engine's own limit: one home
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
        # QueueFull: a 429 (server/errors.py); a batch line waits in the background lane.
        future = self.batcher.submit(job, locs, background=self.background)
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


def registry_of(state: ServerState) -> ModelRegistry:
    if state.models is None:  # before start-up has opened the state: nothing is served yet
        raise APIError(
            503,
            "the server is starting",
            code=ErrorCode.MODEL_NOT_READY,
            headers={"Retry-After": "5"},
        )
    return state.models


def check_access(account: Account, model: ServedModel, named: str | None) -> None:
    """OpenAI's answers: a model the key may not use 'does not exist' for it (404) when the
    request names it; with ``model`` omitted, the default model is refused (403)."""
    if account.allows(*model.spec.names):
        return
    if named is not None:
        raise APIError(
            404,
            f"the model {named!r} does not exist or this key does not have access to it",
            code=ErrorCode.MODEL_NOT_FOUND,
            param="model",
        )
    raise APIError(
        403,
        f"this key may not use the default model {model.name!r}; name a model it may use",
        code=ErrorCode.MODEL_NOT_ALLOWED,
    )


def check_kind(models: ModelRegistry, model: ServedModel, kind: Task) -> None:
    """A route's model is of its kind: a captioner answers only caption routes, a matching model
    only the others (400 ``unsupported_model``, naming the models that do)."""
    if model.kind in (kind, None):
        return
    fits = ", ".join(repr(m.name) for m in models.models if m.kind == kind) or "none"
    what = "writes captions" if model.kind == "caption" else "matches images and texts"
    raise APIError(
        400,
        f"the model {model.name!r} {what} and does not serve this endpoint; the models that do: "
        f"{fits}",
        code=ErrorCode.UNSUPPORTED_MODEL,
        param="model",
    )


def ready(body_type: type[B], kind: Task = "itm") -> Any:
    """``Depends`` for a route whose body is ``body_type``, served by models of ``kind``: see the
    module docstring. A request that names no model gets the default model, or, when that is of
    another kind, the first model of this one."""

    async def dependency(body: B, request: Request) -> AsyncIterator[RequestContext[B]]:
        state = server_state(request)
        models = registry_of(state)
        model = models.resolve(body.model, kind)
        account = account_of(request.scope)
        check_access(account, model, body.model)
        check_kind(models, model, kind)
        # A batch line has until its batch expires (the runner stops it then), not a request's.
        timeout = BATCH_LINE_TIMEOUT_S if request.scope.get(SCOPE_BACKGROUND) else None
        deadline = asyncio.get_running_loop().time() + (timeout or state.settings.request_timeout_s)
        loaded = await models.acquire(model, deadline)
        try:
            check_kind(models, model, kind)  # a model of no known kind is known once loaded
            yield RequestContext(body, request, state, model, loaded, deadline, account)
        finally:
            models.release(model)

    # FastAPI reads the body's model from the signature; this route's model, not the TypeVar.
    dependency.__annotations__["body"] = body_type
    return Depends(dependency)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read; only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
