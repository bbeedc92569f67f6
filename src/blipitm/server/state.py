"""The server's state: settings, metrics, and the engine, batcher and image loader once loaded.

Lifecycle (open, load, close) lives here; the steps of one request live in ``context.py``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from blipitm.engine.batcher import Batcher
from blipitm.engine.jobs import WarmUp
from blipitm.retrieval import Index
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.images import ImageLoader
from blipitm.server.metrics import Metrics
from blipitm.server.settings import ServerSettings
from blipitm.server.urlfetch import URLFetcher

if TYPE_CHECKING:
    from blipitm.engine import Engine  # torch: loaded when the app loads a model, not on import

T = TypeVar("T")

log = logging.getLogger("blipitm.server")

EngineFactory = Callable[[ServerSettings], "Engine"]


@dataclass(frozen=True)
class Loaded:
    """What a request needs once the model is up: the engine, its inference worker, the loader."""

    engine: Engine
    batcher: Batcher
    loader: ImageLoader


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
        engine = await _in_passing_thread(factory, s)
        self.engine = engine
        assert self.executor is not None, "open() first"
        # The engine decodes (its input size, protocol, pixel limit and decode budget).
        self.loader = ImageLoader(
            prepare=engine.prepare_image,
            executor=self.executor,
            fetcher=self.fetcher,
            max_bytes=s.max_image_bytes,
            metrics=self.metrics,
        )
        if s.index is not None:  # opened against the engine: another model is refused here
            self.index = await _in_passing_thread(Index.open, s.index, engine)
        self.metrics.watch_cache(lambda: engine.cache.stats)
        self.batcher = Batcher(
            engine,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            observer=self.metrics.batcher_observer(),
        )
        self.batcher.start()
        await asyncio.wrap_future(self.batcher.submit(WarmUp()))
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

    def require_ready(self) -> Loaded:
        if not self.ready or self.engine is None or self.batcher is None or self.loader is None:
            raise APIError(
                503,
                "the model is still loading"
                if self.load_error is None
                else "the model failed to load",
                code=ErrorCode.MODEL_NOT_READY,
                headers={"Retry-After": "5"},
            )
        return Loaded(self.engine, self.batcher, self.loader)

    def check_model(self, model: str | None) -> None:
        """``model`` may be omitted; if given it must name the served model."""
        accepted = {self.settings.model_name, self.settings.model}
        if model is not None and model not in accepted:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves "
                f"{self.settings.model_name!r}",
                code=ErrorCode.MODEL_NOT_FOUND,
                param="model",
            )


async def _in_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread that ends with it, not on the loop's long-lived default pool.

    Torch's OpenMP keeps a team of worker threads for every thread that ran a parallel op; a
    second live team beside the inference worker's made the worker's text batches about 15%
    slower on a 2-core machine (BENCHMARKS.md, server overhead). The team goes with its thread.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="blipitm-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread exits once fn returns (now, unless cancelled)
