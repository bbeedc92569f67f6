"""Prometheus metrics named ``blipitm_*``, in a registry per app (tests run several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class Models(Protocol):
    """What the metrics read of the served models at scrape time (``ModelRegistry``)."""

    @property
    def models(self) -> Sequence[Any]: ...


class _ModelCollector(Collector):
    """Reads each model's state and engine cache counters at scrape time (no polling thread,
    never stale): ``blipitm_model_loaded``, ``blipitm_queue_depth``, ``blipitm_cache_*``."""

    def __init__(self, models: Callable[[], Models | None]) -> None:
        self._models = models

    def collect(self) -> Iterator[Any]:
        registry = self._models()
        if registry is None:
            return
        loaded = GaugeMetricFamily(
            "blipitm_model_loaded", "1 while the model is loaded, by model", labels=["model"]
        )
        depth = GaugeMetricFamily(
            "blipitm_queue_depth",
            "Requests waiting for a model's inference worker",
            labels=["model"],
        )
        ratio = GaugeMetricFamily(
            "blipitm_cache_hit_ratio",
            "Share of image lookups answered by the engine's encoded-image cache",
            labels=["model"],
        )
        hits = CounterMetricFamily(
            "blipitm_cache_hits", "Encoded-image cache hits", labels=["model"]
        )
        misses = CounterMetricFamily(
            "blipitm_cache_misses", "Encoded-image cache misses", labels=["model"]
        )
        for model in registry.models:
            on = model.loaded is not None
            loaded.add_metric([model.name], 1.0 if on else 0.0)
            if not on:
                continue
            depth.add_metric([model.name], model.loaded.batcher.depth)
            stats = model.loaded.engine.cache.stats
            ratio.add_metric([model.name], stats.hit_ratio)
            hits.add_metric([model.name], stats.hits)
            misses.add_metric([model.name], stats.misses)
        yield from (loaded, depth, ratio, hits, misses)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blipitm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "blipitm_request_duration_seconds",
            "Total time per request, by route",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "blipitm_queue_duration_seconds",
            "Time a request waited in its model's inference queue",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "blipitm_preprocess_duration_seconds",
            "Time spent decoding / fetching a request's images before queueing",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "blipitm_inference_duration_seconds",
            "Time of one worker batch on the model",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "blipitm_batch_size",
            "Requests merged into one worker batch",
            ["model"],
            buckets=_BATCH,
            registry=r,
        )
        self.model_loads = Counter(
            "blipitm_model_loads",
            "Model loads by model and outcome (ok, failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.model_evictions = Counter(
            "blipitm_model_evictions",
            "Models unloaded to make room for another (--max-loaded-models)",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "blipitm_rejected",
            "Requests refused by backpressure or deadline",
            ["reason"],
            registry=r,
        )
        self.image_fetch_failures = Counter(
            "blipitm_image_fetch_failures",
            "Image URLs that were refused or could not be fetched, by reason",
            ["reason"],
            registry=r,
        )
        self._models: Models | None = None
        r.register(_ModelCollector(lambda: self._models))

    def batcher_observer(self, model: str) -> BatcherMetrics:
        """The reports of ``model``'s inference worker (``blipitm.engine.batcher.
        BatcherObserver``) as these metrics."""
        return BatcherMetrics(self, model)

    def watch_models(self, models: Models) -> None:
        self._models = models

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BatcherMetrics:
    """A ``BatcherObserver``: the batcher reports, the server's metrics count."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics = metrics
        self._waited = metrics.queue_duration.labels(model=model)
        self._size = metrics.batch_size.labels(model=model)
        self._duration = metrics.inference_duration.labels(model=model)

    def queue_depth(self, depth: int) -> None:
        pass  # read at scrape time (_ModelCollector)

    def refused(self) -> None:
        self._metrics.rejected.labels(reason="queue_full").inc()

    def waited(self, seconds: float) -> None:
        self._waited.observe(seconds)

    def batch_started(self, size: int) -> None:
        self._size.observe(size)

    def batch_finished(self, seconds: float) -> None:
        self._duration.observe(seconds)
