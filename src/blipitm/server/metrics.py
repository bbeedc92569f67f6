"""Prometheus metrics named ``blipitm_*``, in a registry per app (tests run several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class _CacheCollector(Collector):
    """Reads the engine's cache counters at scrape time (no polling thread, never stale)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "blipitm_cache_hit_ratio",
            "Share of image lookups answered by the engine's encoded-image cache",
            value=stats.hit_ratio,
        )
        hits = CounterMetricFamily("blipitm_cache_hits", "Encoded-image cache hits")
        hits.add_metric([], stats.hits)
        yield hits
        misses = CounterMetricFamily("blipitm_cache_misses", "Encoded-image cache misses")
        misses.add_metric([], stats.misses)
        yield misses


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
            "Time a request waited in the inference queue",
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
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "blipitm_batch_size",
            "Requests merged into one worker batch",
            buckets=_BATCH,
            registry=r,
        )
        self.queue_depth = Gauge(
            "blipitm_queue_depth", "Requests waiting for the inference worker", registry=r
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
        self._cache_stats: Callable[[], Any] | None = None
        r.register(_CacheCollector(lambda: self._cache_stats() if self._cache_stats else None))

    def batcher_observer(self) -> BatcherMetrics:
        """The inference worker's reports (``blipitm.engine.batcher.BatcherObserver``) as these
        metrics."""
        return BatcherMetrics(self)

    def watch_cache(self, stats: Callable[[], Any]) -> None:
        self._cache_stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BatcherMetrics:
    """A ``BatcherObserver``: the batcher reports, the server's metrics count."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def queue_depth(self, depth: int) -> None:
        self._metrics.queue_depth.set(depth)

    def refused(self) -> None:
        self._metrics.rejected.labels(reason="queue_full").inc()

    def waited(self, seconds: float) -> None:
        self._metrics.queue_duration.observe(seconds)

    def batch_started(self, size: int) -> None:
        self._metrics.batch_size.observe(size)

    def batch_finished(self, seconds: float) -> None:
        self._metrics.inference_duration.observe(seconds)
