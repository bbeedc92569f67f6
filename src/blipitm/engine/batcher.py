"""Dynamic batching: one worker thread that runs jobs on one engine, fed by a bounded queue.

The engine is not thread-safe and one model saturates the device, so exactly one thread calls it.
Torch releases the GIL during compute, so the caller's threads (the server's event loop, its
decoding pool) keep working meanwhile. The worker takes the first queued job, then keeps taking
jobs until it has ``max_batch_size`` of them or ``max_wait_ms`` has passed, and merges jobs of one
:class:`Mergeable` class into one engine call (many text-embedding jobs -> one ``encode_texts``).
Results are split back per job, token counts included (each job's usage is its own texts').

The batcher knows no job class: a job is anything with ``run(engine)``; one that can share an
engine call with others of its class adds ``merge(jobs) -> (job, split)``. The engine's jobs are
in :mod:`blipitm.engine.jobs`; a front end may bring its own (the server's search is one). Nothing
here is HTTP: the server, the Batch API or a Ray actor drive it alike, and whoever wants numbers
passes a :class:`BatcherObserver` (the server's maps them to its Prometheus metrics).

Isolation: if a merged call raises, its jobs are re-run one by one, so only the bad job fails (and
an error's ``loc`` is translated back into that job's own by its ``LocMap``).

Priority: a job submitted with ``background=True`` (the Batch API's lines) waits in a lane of its
own, unbounded (its submitter bounds what it has in flight), and the worker takes it only when no
online job is queued: online requests are served first, background work fills the idle capacity.
A worker batch of background jobs (at most ``max_background_batch`` of them) yields to online
work between two layers of the model (:mod:`blipitm.preemption`): the online jobs queued
meanwhile run then, to completion, and the background batch goes on where it was. So an online
request that arrives during background work waits for about one layer of it, not the batch.

Backpressure: ``submit`` never blocks; a full queue is :class:`QueueFull`. Cancellation: each job
carries a ``concurrent.futures.Future``; a caller that gives up (client gone, deadline) cancels it,
and the worker skips cancelled jobs when it takes them. A job whose future the worker has taken
can no longer be cancelled: its compute is spent (the server bills it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, cast, runtime_checkable

from blipitm.errors import InvalidInputError, Loc
from blipitm.preemption import yielding_to

if TYPE_CHECKING:
    from blipitm.engine.captioner import Captioner
    from blipitm.engine.engine import Engine

log = logging.getLogger("blipitm.batcher")

# Background jobs in one worker batch: large enough that a batch runs at the engine's speed
# (BENCHMARKS.md, "Batch API": 32 lines of 8 captions, 1.01x Engine.encode_texts), since online
# work no longer waits for the batch, only for the layer in hand.
DEFAULT_BACKGROUND_BATCH = 32

# An engine error's location -> the caller's: ("texts", 3) -> ("input", 5).
LocMap = Callable[[Loc], Loc]
# A merged job's result -> each merged job's own, in job order.
Split = Callable[[Any], Sequence[Any]]


class Job(Protocol):
    """One piece of work for the worker: ``run`` makes its engine call(s) on the worker thread.
    ``engine`` is the batcher's: an :class:`Engine`, or a captioner (a job knows which it needs;
    the server routes a request only to a model of the route's kind)."""

    def run(self, engine: Any) -> Any: ...


@runtime_checkable
class Mergeable(Protocol):
    """A job that can share one engine call with other jobs of its own class."""

    def run(self, engine: Any) -> Any: ...

    @classmethod
    def merge(cls, jobs: Sequence[Self]) -> tuple[Job, Split]:
        """One job that does the work of ``jobs`` (two or more, all of this class), and how to
        split its result back into theirs."""
        ...


class BatcherObserver(Protocol):
    """What the batcher reports as it works (the server turns it into metrics). Called on the
    submitting thread (``queue_depth``, ``refused``) or on the worker thread (the rest); each
    must be cheap and must not raise."""

    def queue_depth(self, depth: int) -> None:
        """Jobs waiting, after a submit or after the worker took a batch."""

    def refused(self) -> None:
        """A submit found the queue full (:class:`QueueFull`)."""

    def waited(self, seconds: float) -> None:
        """A job the worker took had waited this long in the queue (once per live job)."""

    def batch_started(self, size: int) -> None:
        """The worker starts running a batch of ``size`` live jobs."""

    def batch_finished(self, seconds: float) -> None:
        """That batch took ``seconds`` on the engine."""


class NoObserver:
    """The default observer: reports go nowhere."""

    def queue_depth(self, depth: int) -> None:
        pass

    def refused(self) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def batch_started(self, size: int) -> None:
        pass

    def batch_finished(self, seconds: float) -> None:
        pass


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"inference queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


@dataclass
class _Work:
    job: Job
    future: Future[Any]
    locs: LocMap
    background: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


def _same_loc(loc: Loc) -> Loc:
    return loc


class Batcher:
    def __init__(
        self,
        engine: Engine | Captioner,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        observer: BatcherObserver | None = None,
        max_background_batch: int = DEFAULT_BACKGROUND_BATCH,
    ) -> None:
        """``max_background_batch``: the most background jobs in one worker batch. An online
        request that arrives while one runs waits for it, so it is kept short; a batch that starts
        with an online job may take up to ``max_batch_size``."""
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_background_batch = max_background_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.observer: BatcherObserver = NoObserver() if observer is None else observer
        self._cond = threading.Condition()
        self._online: deque[_Work] = deque()  # at most max_queue
        self._background: deque[_Work] = deque()
        self._stop_requested = False
        self._batch_seconds = 0.05  # running mean, for Retry-After
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="blipitm-inference", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, fail what is still queued, join the thread."""
        with self._cond:
            queued = [*self._online, *self._background]
            self._online.clear()
            self._background.clear()
            self._stop_requested = True
            self._cond.notify_all()
        for item in queued:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- submitting -----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Online jobs waiting (background ones: :attr:`background_depth`)."""
        return len(self._online)

    @property
    def background_depth(self) -> int:
        return len(self._background)

    def has_room(self) -> bool:
        return len(self._online) < self.max_queue

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth: an honest hint."""
        batches = max(1, math.ceil(self.depth / self.max_batch_size))
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    def submit(
        self, job: Job, locs: LocMap = _same_loc, *, background: bool = False
    ) -> Future[Any]:
        """Queue ``job``; raises :class:`QueueFull` instead of waiting. ``background``: run it
        only when no online job waits (never refused: its submitter bounds it)."""
        work = _Work(job, Future(), locs, background)
        with self._cond:
            if self._stop_requested:
                work.future.set_exception(RuntimeError("server is shutting down"))
                return work.future
            if background:
                self._background.append(work)
            elif len(self._online) >= self.max_queue:
                self.observer.refused()
                raise QueueFull(self.retry_after_s())
            else:
                self._online.append(work)
            self._cond.notify()
            depth = len(self._online)
        self.observer.queue_depth(depth)
        return work.future

    def _pop(self, timeout: float | None, *, background: bool = True) -> _Work | None:
        """The next job, online first (``background=False``: online only); None once stopping,
        or after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._online or (background and self._background) or self._stop_requested,
                timeout,
            )
            if self._stop_requested:
                self._stopping = True  # finish the batch in hand, then exit
                return None
            if self._online:
                return self._online.popleft()
            return self._background.popleft() if background and self._background else None

    # -- worker thread --------------------------------------------------------------------------

    def _take_batch(self) -> list[_Work] | None:
        first = None
        while first is None:
            if self._stopping:
                return None
            first = self._pop(None)
        batch: list[_Work] = [first]
        # A batch an online job starts takes no background job (it answers sooner); one of
        # background jobs takes at most max_background_batch of them (and any online job).
        background = int(first.background) if first.background else self.max_background_batch
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size and not self._stopping:
            more = background < self.max_background_batch
            item = self._pop(max(0.0, deadline - time.perf_counter()), background=more)
            if item is None:
                break
            batch.append(item)
            background += item.background
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch[0].background:
                with yielding_to(self._serve_online):
                    self._execute(batch)
            else:
                self._execute(batch)

    def _serve_online(self) -> None:
        """At a yield point of a background batch: run the online jobs queued now, to the end
        (batched as usual, without waiting for more, and with no yield points of their own)."""
        while self._online and not self._stopping:
            with self._cond:
                take = min(len(self._online), self.max_batch_size)
                batch = [self._online.popleft() for _ in range(take)]
            with yielding_to(None):
                self._execute(batch)

    def _execute(self, batch: list[_Work]) -> None:
        """One worker batch: its live jobs run, timed and reported."""
        self.observer.queue_depth(self.depth)
        now = time.perf_counter()
        # Cancelled futures (client gone, deadline passed) are dropped here, before compute.
        live = [w for w in batch if w.future.set_running_or_notify_cancel()]
        if not live:
            return
        for w in live:
            self.observer.waited(now - w.enqueued)
        self.observer.batch_started(len(live))
        started = time.perf_counter()
        try:
            self._run_batch(live)
        except BaseException as e:  # never let the worker die with futures pending
            log.exception("inference worker failed")
            for w in live:
                if not w.future.done():
                    w.future.set_exception(e)
        elapsed = time.perf_counter() - started
        self.observer.batch_finished(elapsed)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed

    def _run_batch(self, live: list[_Work]) -> None:
        groups: dict[type, list[_Work]] = {}
        for w in live:
            groups.setdefault(type(w.job), []).append(w)
        for works in groups.values():
            if len(works) > 1 and self._run_merged(works):
                continue
            for w in works:
                self._run_single(w)

    def _run_merged(self, works: list[_Work]) -> bool:
        """One engine call for jobs of one mergeable class; False if they are not mergeable or
        the merged call failed (the caller then runs them one by one)."""
        first = works[0].job
        if not isinstance(first, Mergeable):
            return False
        try:
            # One class per group, so every job is mergeable like the first.
            merged, split = first.merge([cast(Mergeable, w.job) for w in works])
            results = split(merged.run(self.engine))
        except Exception:
            log.debug("merged batch of %d failed; re-running one by one", len(works))
            return False
        for w, r in zip(works, results, strict=True):
            w.future.set_result(r)
        return True

    def _run_single(self, w: _Work) -> None:
        try:
            result = w.job.run(self.engine)
        except InvalidInputError as e:
            # Rebuild the error with the job's own location (("texts", 3) -> ("input", 3)).
            w.future.set_exception(type(e)(e.reason, loc=w.locs(e.loc)))
        except Exception as e:
            w.future.set_exception(e)
        else:
            w.future.set_result(result)
