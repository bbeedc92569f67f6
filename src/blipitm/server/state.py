"""The server's state: settings, metrics, the I/O pool and URL fetcher, and the served models.

Lifecycle (open, load, close) lives here and in ``registry.py`` (one entry per model); the steps
of one request live in ``context.py``."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.metrics import Metrics
from blipitm.server.registry import EngineFactory, Loaded, ModelRegistry
from blipitm.server.settings import ServerSettings
from blipitm.server.urlfetch import URLFetcher

__all__ = ["EngineFactory", "Loaded", "ServerState"]


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    models: ModelRegistry | None = None
    executor: ThreadPoolExecutor | None = None
    fetcher: URLFetcher | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, factory: EngineFactory) -> None:
        """The I/O pool, the URL fetcher and the models (none loaded yet): reads a models file,
        so a bad one fails start-up."""
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
        self.models = ModelRegistry(
            s.models(),
            s,
            self.metrics,
            factory,
            executor=self.executor,
            fetcher=self.fetcher,
        )

    async def close(self) -> None:
        if self.models is not None:
            await self.models.close()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- what requests ask ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The default model is loaded (``/ready``)."""
        return self.models is not None and self.models.default.status == "ready"

    @property
    def load_error(self) -> str | None:
        """Why the default model failed to load, if it did."""
        return None if self.models is None else self.models.default.error

    def require_ready(self) -> Loaded:
        """The default model, loaded; else 503 (loading, or failed)."""
        model = None if self.models is None else self.models.default
        if model is None or model.status != "ready" or model.loaded is None:
            raise APIError(
                503,
                "the model is still loading"
                if self.load_error is None
                else "the model failed to load",
                code=ErrorCode.MODEL_NOT_READY,
                headers={"Retry-After": "5"},
            )
        return model.loaded
