"""Dynamic batching: one inference thread fed by a bounded queue.

The engine is not thread-safe and one model saturates the device, so exactly one thread calls it.
Torch releases the GIL during compute, so the event loop keeps serving (and decoding on its own
pool) meanwhile. The worker takes the first queued item, then keeps taking items until it has
``max_batch_size`` of them or ``max_wait_ms`` has passed, and merges items of the same kind into
one engine call (many text-embedding requests -> one ``encode_texts``; many score requests -> one
``score_pairs`` over the concatenated images and texts). Results are split back per request,
token counts included (each request's usage is its own texts').

Isolation: if a merged call raises, its items are re-run one by one, so only the bad request fails
(and an error's ``loc`` is translated back into that request's own).

Backpressure: ``submit`` never blocks; a full queue is :class:`QueueFull` (-> 429). Cancellation:
each item carries a ``concurrent.futures.Future``; a request that gives up (client gone, deadline)
cancels it, and the worker skips cancelled items when it takes them.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from blipitm.engine import Explanation, PairScores, Ranking, TextFeatures
from blipitm.errors import InvalidInputError, Loc
from blipitm.server.metrics import Metrics

log = logging.getLogger("blipitm.server")

# An engine error's location -> the request's: ("texts", 3) -> ("input", 5).
LocMap = Callable[[Loc], Loc]


class EngineLike(Protocol):
    """What the worker needs from :class:`blipitm.Engine` (tests pass slow or failing fakes)."""

    def encode_texts(self, texts: Sequence[str]) -> TextFeatures: ...

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def score_pairs(
        self, images: Sequence[Any], texts: Sequence[str], pairs: Sequence[tuple[int, int]]
    ) -> PairScores: ...

    def rank_texts(
        self,
        image: Any,
        texts: Sequence[str],
        *,
        top_k: int | None = None,
        rerank_k: int | None = 128,
    ) -> Ranking: ...

    def rank_images(
        self,
        text: str,
        images: Sequence[Any],
        *,
        top_k: int | None = None,
        rerank_k: int | None = 128,
    ) -> Ranking: ...

    def explain_batch(
        self, image: Any, texts: Sequence[str], *, layer: int | None = None
    ) -> list[Explanation]: ...


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"inference queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


# -- work items -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedTexts:
    texts: list[str]


@dataclass(frozen=True)
class EmbedImages:
    images: list[Any]


@dataclass(frozen=True)
class ScorePairs:
    images: list[Any]
    texts: list[str]
    pairs: list[tuple[int, int]]  # (image index, text index) per pair


@dataclass(frozen=True)
class Rank:
    query: Any
    candidates: list[Any]
    rerank_k: int | None
    image_query: bool  # an image ranks texts; otherwise a text ranks images


@dataclass(frozen=True)
class Explain:
    """Grad-CAM of a few captions of one image: a bounded piece of an explanation request (the
    route queues its captions piece by piece, so other requests run in between)."""

    image: Any
    texts: list[str]
    layer: int


@dataclass(frozen=True)
class Call:
    """Run a function on the worker thread (warm-up); never merged."""

    fn: Callable[[Any], Any]


Job = EmbedTexts | EmbedImages | ScorePairs | Rank | Explain | Call


@dataclass
class _Work:
    job: Job
    future: Future[Any]
    locs: LocMap
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


# -- engine calls, single and merged --------------------------------------------------------------


def run_one(engine: EngineLike, job: Job) -> Any:
    if isinstance(job, EmbedTexts):
        return engine.encode_texts(job.texts)
    if isinstance(job, EmbedImages):
        return engine.embed_images(job.images)
    if isinstance(job, ScorePairs):
        return engine.score_pairs(job.images, job.texts, job.pairs)
    if isinstance(job, Rank):
        rank = engine.rank_texts if job.image_query else engine.rank_images
        return rank(job.query, job.candidates, top_k=None, rerank_k=job.rerank_k)
    if isinstance(job, Explain):
        return engine.explain_batch(job.image, job.texts, layer=job.layer)
    return job.fn(engine)


def _split(array: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1]) if sizes else []


def run_merged(engine: EngineLike, jobs: Sequence[Job]) -> list[Any]:
    """One engine call for several jobs of one mergeable kind; results in job order."""
    first = jobs[0]
    if isinstance(first, EmbedTexts):
        text_jobs = [j for j in jobs if isinstance(j, EmbedTexts)]
        feats = engine.encode_texts([t for j in text_jobs for t in j.texts])
        sizes = [len(j.texts) for j in text_jobs]
        return [
            TextFeatures(e, n)
            for e, n in zip(
                _split(feats.embeddings, sizes), _split(feats.text_tokens, sizes), strict=True
            )
        ]
    if isinstance(first, EmbedImages):
        image_jobs = [j for j in jobs if isinstance(j, EmbedImages)]
        out = engine.embed_images([im for j in image_jobs for im in j.images])
        return _split(out, [len(j.images) for j in image_jobs])
    if isinstance(first, ScorePairs):
        score_jobs = [j for j in jobs if isinstance(j, ScorePairs)]
        images: list[Any] = []
        texts: list[str] = []
        pairs: list[tuple[int, int]] = []
        for j in score_jobs:
            pairs += [(i + len(images), t + len(texts)) for i, t in j.pairs]
            images += j.images
            texts += j.texts
        # Identical images across requests are encoded once: the engine dedups by content hash
        # within a call and keeps encoded images in its cache across calls.
        scores = engine.score_pairs(images, texts, pairs)
        sizes = [len(j.pairs) for j in score_jobs]
        return [
            PairScores(p, lg, c, n)
            for p, lg, c, n in zip(
                _split(scores.itm_probability, sizes),
                _split(scores.itm_logits, sizes),
                _split(scores.itc_cosine, sizes),
                _split(scores.text_tokens, [len(j.texts) for j in score_jobs]),
                strict=True,
            )
        ]
    raise TypeError(f"{type(first).__name__} jobs are not merged")


MERGEABLE = (EmbedTexts, EmbedImages, ScorePairs)


# -- the worker -----------------------------------------------------------------------------------


class Batcher:
    def __init__(
        self,
        engine: EngineLike,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._batch_seconds = 0.05  # running mean, for Retry-After
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="blipitm-inference", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, fail what is still queued, join the thread."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Work) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("server is shutting down"))
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # -- submitting -----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def has_room(self) -> bool:
        return self._queue.qsize() < self.max_queue

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth: an honest hint."""
        batches = max(1, math.ceil(self.depth / self.max_batch_size))
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    def submit(self, job: Job, locs: LocMap = lambda loc: loc) -> Future[Any]:
        """Queue ``job``; raises :class:`QueueFull` instead of waiting."""
        work = _Work(job, Future(), locs)
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(self.retry_after_s()) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return work.future

    # -- worker thread --------------------------------------------------------------------------

    def _take_batch(self) -> list[_Work] | None:
        if self._stopping:
            return None
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[_Work] = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else None
                if item is None:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True  # finish this batch, then exit
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self.metrics.queue_depth.set(self._queue.qsize())
            now = time.perf_counter()
            # Cancelled futures (client gone, deadline passed) are dropped here, before compute.
            live = [w for w in batch if w.future.set_running_or_notify_cancel()]
            if not live:
                continue
            for w in live:
                self.metrics.queue_duration.observe(now - w.enqueued)
            self.metrics.batch_size.observe(len(live))
            started = time.perf_counter()
            try:
                self._run_batch(live)
            except BaseException as e:  # never let the worker die with futures pending
                log.exception("inference worker failed")
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(e)
            elapsed = time.perf_counter() - started
            self.metrics.inference_duration.observe(elapsed)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed

    def _run_batch(self, live: list[_Work]) -> None:
        groups: dict[type, list[_Work]] = {}
        for w in live:
            groups.setdefault(type(w.job), []).append(w)
        for kind, works in groups.items():
            if kind in MERGEABLE and len(works) > 1:
                try:
                    results = run_merged(self.engine, [w.job for w in works])
                except Exception:
                    log.debug("merged batch of %d failed; re-running one by one", len(works))
                else:
                    for w, r in zip(works, results, strict=True):
                        w.future.set_result(r)
                    continue
            for w in works:
                self._run_single(w)

    def _run_single(self, w: _Work) -> None:
        try:
            result = run_one(self.engine, w.job)
        except InvalidInputError as e:
            # Rebuild the error with this request's own location (("texts", 3) -> ("input", 3)).
            w.future.set_exception(type(e)(e.reason, loc=w.locs(e.loc)))
        except Exception as e:
            w.future.set_exception(e)
        else:
            w.future.set_result(result)
