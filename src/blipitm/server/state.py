"""What the routes share: the engine, the batcher, the image loader, and the per-request steps
(model-name check, deadline, image loading, running a job while watching for the client leaving)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.requests import Request

from blipitm.engine import Engine
from blipitm.errors import InvalidInputError
from blipitm.processing import (
    PixelBudget,
    ResizedImage,
    return_image_memory_to_os,
    validate_text,
)
from blipitm.retrieval import Index
from blipitm.server.batching import Batcher, Call, FieldMap, Job, QueueFull
from blipitm.server.errors import APIError, from_invalid_input
from blipitm.server.images import ImageLoader
from blipitm.server.inputs import ImageItem, TextItem
from blipitm.server.metrics import Metrics
from blipitm.server.settings import ServerSettings
from blipitm.server.urlfetch import URLFetcher

log = logging.getLogger("blipitm.server")

EngineFactory = Callable[[ServerSettings], Engine]


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    engine: Engine | None = None
    batcher: Batcher | None = None
    loader: ImageLoader | None = None
    executor: ThreadPoolExecutor | None = None
    fetcher: URLFetcher | None = None
    index: Index | None = None
    ready: bool = False
    load_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        s = self.settings
        return_image_memory_to_os()  # so that --max-decoded-pixels bounds the resident memory
        self.executor = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="blipitm-io")
        if s.allow_url_fetch:
            self.fetcher = URLFetcher(
                max_bytes=s.max_image_bytes,
                timeout_s=s.url_timeout_s,
                max_redirects=s.url_max_redirects,
                allowlist=s.url_allowlist,
                allow_loopback=s._allow_loopback_for_tests,
            )

    async def load_model(self, factory: EngineFactory) -> None:
        """Load, start the worker, and run a real forward pass; only then is the server ready."""
        s = self.settings
        engine = await asyncio.to_thread(factory, s)
        self.engine = engine
        assert self.executor is not None, "open() first"
        # Images are resized for this engine (its input size and protocol) as they are decoded.
        self.loader = ImageLoader(
            executor=self.executor,
            fetcher=self.fetcher,
            max_bytes=s.max_image_bytes,
            max_pixels=engine.max_pixels,  # the engine's limit: one home, set by the settings
            budget=PixelBudget(s.max_decoded_pixels, setting="--max-decoded-pixels"),
            image_settings=engine.image_settings,
            protocol=engine.protocol,
            metrics=self.metrics,
        )
        if s.index is not None:  # opened against the engine: another model is refused here
            self.index = await asyncio.to_thread(Index.open, s.index, engine)
        self.metrics.watch_cache(lambda: engine.cache.stats)
        self.batcher = Batcher(
            engine,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            metrics=self.metrics,
        )
        self.batcher.start()
        warm = Image.new("RGB", (64, 64), (128, 128, 128))
        await asyncio.wrap_future(
            self.batcher.submit(Call(lambda e: e.score(warm, "a warm-up caption")))
        )
        info = engine.info
        log.info(
            "serving %s as %r: revision=%s commit=%s protocol=%s device=%s dtype=%s "
            "embedding_dim=%d index=%s overrides=[%s]",
            info.source,
            s.model_name,
            info.revision,
            info.commit,
            info.protocol,
            info.device,
            info.dtype,
            info.embedding_dim,
            s.index,
            "; ".join(str(o) for o in info.overrides),
        )
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        if self.fetcher is not None:
            await self.fetcher.aclose()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()
        if self.index is not None:
            self.index.close()

    # -- per request ----------------------------------------------------------------------------

    def require_ready(self) -> tuple[Engine, Batcher, ImageLoader]:
        if not self.ready or self.engine is None or self.batcher is None or self.loader is None:
            raise APIError(
                503,
                "the model is still loading"
                if self.load_error is None
                else "the model failed to load",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        return self.engine, self.batcher, self.loader

    def check_model(self, model: str | None) -> None:
        """``model`` may be omitted; if given it must name the served model."""
        accepted = {self.settings.model_name, self.settings.model}
        if model is not None and model not in accepted:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves "
                f"{self.settings.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    def check_room(self, batcher: Batcher) -> None:
        """Refuse before decoding anything when the queue is already full."""
        if not batcher.has_room():
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise _queue_full(batcher.retry_after_s())

    def validate_texts(self, items: Sequence[TextItem]) -> list[str]:
        """Checked before queueing, with the engine's own limit, so a bad text fails alone."""
        engine, _, _ = self.require_ready()
        out = []
        for item in items:
            try:
                out.append(
                    validate_text(item.text, field=item.param, max_chars=engine.max_text_chars)
                )
            except InvalidInputError as e:
                raise from_invalid_input(e, item.param) from None
        return out

    async def load_images(self, items: Sequence[ImageItem], deadline: float) -> list[ResizedImage]:
        if not items:
            return []
        _, _, loader = self.require_ready()
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                return await loader.load_all([i.source for i in items], [i.param for i in items])
        except TimeoutError:
            raise self._timeout() from None
        finally:
            self.metrics.preprocess_duration.observe(time.perf_counter() - started)

    async def run(self, request: Request, job: Job, fields: FieldMap, deadline: float) -> Any:
        """Queue ``job`` and wait for it, its deadline, or the client going away."""
        _, batcher, _ = self.require_ready()
        try:
            future = batcher.submit(job, fields)
        except QueueFull as e:
            raise _queue_full(e.retry_after_s) from None
        result = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait(
                {result, gone},
                timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
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
        if gone in done:
            self.metrics.rejected.labels(reason="client_disconnected").inc()
            raise APIError(499, "client closed the request", code="client_closed_request")
        self.metrics.rejected.labels(reason="timeout").inc()
        raise self._timeout()

    def _timeout(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.settings.request_timeout_s:g}s",
            code="timeout",
        )

    def count_text_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model reads for ``texts`` (per protocol: cleaned and truncated for blip)."""
        engine, _, _ = self.require_ready()
        return sum(engine.count_tokens(texts)) if texts else 0

    def image_tokens(self) -> int:
        """What one image counts in ``usage``: the vision tokens it becomes (patches + CLS)."""
        engine, _, _ = self.require_ready()
        return engine.info.image_tokens

    async def usage_tokens(self, texts: Sequence[str], n_images: int) -> int:
        loop = asyncio.get_running_loop()
        n_text = await loop.run_in_executor(self.executor, self.count_text_tokens, texts)
        return n_text + n_images * self.image_tokens()


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
