"""The served models at run time: which are loaded, loading on demand, evicting the idle.

Each model has its own engine and its own inference worker (a :class:`Batcher`), so a flood of
requests for one model queues behind that model only: another model's requests wait for their
own worker, never in the flooded queue (``tests/test_server_family.py`` checks it). Loads run one
at a time, on a thread of their own. With ``--max-loaded-models N``, loading another model first
unloads the least recently used one that no request holds (never the default); a request for an
unloaded model waits for its load within its own deadline while the loaded models keep serving.
A model that fails to load answers 503 ``model_unavailable`` to its own requests only; the
reason is logged and shown in ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from blipitm.config import Task
from blipitm.engine.batcher import Batcher
from blipitm.engine.jobs import WarmUp
from blipitm.engine.options import LoadOptions
from blipitm.errors import BlipitmError, InvalidInputError
from blipitm.retrieval import Index
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.family import ModelSpec
from blipitm.server.images import ImageLoader
from blipitm.server.metrics import Metrics
from blipitm.server.settings import ServerSettings
from blipitm.server.urlfetch import URLFetcher

if TYPE_CHECKING:  # torch: loaded when the app loads a model, not on import
    from blipitm.engine import Captioner, Engine

T = TypeVar("T")

log = logging.getLogger("blipitm.server")

# Loads what a checkpoint holds: an Engine (image-text matching) or a Captioner.
EngineFactory = Callable[[LoadOptions], "Engine | Captioner"]
Status = Literal["unloaded", "loading", "ready", "failed"]


@dataclass(frozen=True)
class Loaded:
    """What a request needs of a loaded model: the engine (a captioner's, for one), its worker,
    its loader, its index."""

    engine: Engine | Captioner
    batcher: Batcher
    loader: ImageLoader
    index: Index | None


class ServedModel:
    """One model of the family and where it stands."""

    def __init__(self, spec: ModelSpec, *, default: bool) -> None:
        self.spec = spec
        self.default = default
        self.status: Status = "unloaded"
        self.loaded: Loaded | None = None
        self.error: str | None = None  # why the last load failed
        self.active = 0  # requests holding it: it is not evicted while any does
        self.last_used = 0.0  # monotonic
        self.loads = 0
        self.seen_kind: Task | None = None  # what the checkpoint held, once it has loaded
        # A model that preloads answers 503 (loading) until its start-up load has been tried, as
        # a server that is starting does; one loaded on demand (or again, after an eviction)
        # makes its requests wait for it.
        self.starting = spec.preload

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> Task | None:
        """``itm`` or ``caption``: what the models file says, else what the checkpoint held when
        it last loaded; None for a model never loaded whose file names no kind."""
        return self.spec.kind or self.seen_kind


class ModelRegistry:
    def __init__(
        self,
        specs: list[ModelSpec],
        settings: ServerSettings,
        metrics: Metrics,
        factory: EngineFactory,
        *,
        executor: Executor,
        fetcher: URLFetcher | None,
    ) -> None:
        self.models = [ServedModel(spec, default=i == 0) for i, spec in enumerate(specs)]
        self._by_name = {name: m for m in self.models for name in m.spec.names}
        self._settings = settings
        self._metrics = metrics
        self._factory = factory
        self._executor = executor
        self._fetcher = fetcher
        self._lock = asyncio.Lock()  # one load (or eviction) at a time
        self._freed = asyncio.Event()  # a request released a model: one may be evictable now
        self._tasks: dict[str, asyncio.Task[None]] = {}
        metrics.watch_models(self)

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def resolve(self, name: str | None, kind: Task = "itm") -> ServedModel:
        """The model ``name`` (a served name or an alias) names; None: the default, or the first
        model of ``kind`` when the default is of another."""
        if name is None:
            if self.default.kind in (kind, None):
                return self.default
            return next((m for m in self.models if m.kind == kind), self.default)
        model = self._by_name.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in self.names())
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {served}",
                code=ErrorCode.MODEL_NOT_FOUND,
                param="model",
            )
        return model

    # -- requests --------------------------------------------------------------------------------

    async def acquire(self, model: ServedModel, deadline: float) -> Loaded:
        """``model`` loaded, held until :meth:`release` (so it is not evicted under a request).
        Starts its load if it is not loaded, and waits for it until ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            if model.status == "ready" and model.loaded is not None:
                model.active += 1
                model.last_used = time.monotonic()
                return model.loaded
            if model.status == "failed":
                raise _unavailable(model)
            if model.starting:
                raise APIError(
                    503,
                    f"the model {model.name!r} is loading (the server is starting); retry shortly",
                    code=ErrorCode.MODEL_NOT_READY,
                    headers={"Retry-After": "5"},
                )
            task = self.load(model)
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise APIError(
                    503,
                    f"the model {model.name!r} is still loading; retry shortly",
                    code=ErrorCode.MODEL_NOT_READY,
                    headers={"Retry-After": "5"},
                ) from None
            except Exception:
                pass  # the load failed: the model's status says so, on the next turn

    def release(self, model: ServedModel) -> None:
        model.active -= 1
        model.last_used = time.monotonic()
        self._freed.set()

    # -- loading and eviction --------------------------------------------------------------------

    def load(self, model: ServedModel) -> asyncio.Task[None]:
        """The task loading ``model`` (started if none is running)."""
        task = self._tasks.get(model.name)
        if task is None or task.done():
            task = asyncio.create_task(self._load(model), name=f"load {model.name}")
            self._tasks[model.name] = task
        return task

    async def preload(self) -> None:
        """The default model (raising if it cannot load: the server cannot serve), then the other
        models that preload, one after another (their failures are theirs)."""
        try:
            await self.load(self.default)
        finally:
            self.default.starting = False
        limit = self._settings.max_loaded_models
        for i, model in enumerate(self.models[1:], start=1):
            if model.spec.preload and (not limit or i < limit):  # the rest: loaded on demand
                # A failure is logged, shown in /v1/models, answered 503 for that model only.
                with contextlib.suppress(Exception):
                    await self.load(model)
            model.starting = False

    async def _load(self, model: ServedModel) -> None:
        async with self._lock:
            if model.status == "ready":
                return
            await self._make_room()
            model.status = "loading"
            started = time.perf_counter()
            try:
                model.loaded = await self._open(model.spec)
            except BaseException as e:
                model.status = "failed"
                model.error = str(e) or type(e).__name__
                self._metrics.model_loads.labels(model=model.name, outcome="failed").inc()
                # The default model's failure stops the server, and the app reports it once.
                if not model.default and not isinstance(e, asyncio.CancelledError):
                    log.error(
                        "model %r failed to load: %s",
                        model.name,
                        model.error,
                        exc_info=None if isinstance(e, BlipitmError) else e,
                    )
                raise
            model.status = "ready"
            model.seen_kind = model.loaded.engine.info.task
            model.error = None
            model.loads += 1
            model.last_used = time.monotonic()
            self._metrics.model_loads.labels(model=model.name, outcome="ok").inc()
            log.info("model %r loaded in %.1fs", model.name, time.perf_counter() - started)

    async def _make_room(self) -> None:
        """Unload least recently used idle models until one more fits under the limit; waits
        for a request to release one if every loaded model is in use. The default model is never
        unloaded: it is what ``/ready`` promises."""
        limit = self._settings.max_loaded_models
        while limit and sum(m.status == "ready" for m in self.models) >= limit:
            idle = [
                m for m in self.models if m.status == "ready" and m.active == 0 and not m.default
            ]
            if not idle:
                self._freed.clear()
                await self._freed.wait()
                continue
            await self._unload(min(idle, key=lambda m: m.last_used))

    async def _unload(self, model: ServedModel) -> None:
        loaded, model.loaded, model.status = model.loaded, None, "unloaded"
        log.info("unloading model %r (least recently used)", model.name)
        self._metrics.model_evictions.labels(model=model.name).inc()
        if loaded is not None:
            await asyncio.to_thread(_close, loaded)

    async def _open(self, spec: ModelSpec) -> Loaded:
        """Load, start the worker, and run a real forward pass on it."""
        engine = await _in_passing_thread(self._factory, spec.load)
        index = None
        batcher = None
        try:
            _check_kind(spec, engine.info.task)
            if spec.index is not None:  # opened against the engine: another model is refused
                index = await _in_passing_thread(Index.open, spec.index, cast("Engine", engine))
            s = self._settings
            batcher = Batcher(
                engine,
                max_batch_size=s.max_batch_size,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                observer=self._metrics.batcher_observer(spec.name),
                max_background_batch=s.batch_worker_lines,
            )
            batcher.start()
            await asyncio.wrap_future(batcher.submit(WarmUp()))
        except BaseException:
            if batcher is not None:
                await asyncio.to_thread(batcher.stop)
            if index is not None:
                index.close()
            engine.close()
            raise
        # The engine decodes (its input size, protocol, pixel limit and decode budget).
        loader = ImageLoader(
            prepare=engine.prepare_image,
            executor=self._executor,
            fetcher=self._fetcher,
            max_bytes=self._settings.max_image_bytes,
            metrics=self._metrics,
        )
        info = engine.info
        log.info(
            "serving %s as %r: revision=%s commit=%s protocol=%s device=%s dtype=%s "
            "embedding_dim=%d index=%s overrides=[%s]",
            info.source,
            spec.name,
            info.revision,
            info.commit,
            info.protocol,
            info.device,
            info.dtype,
            info.embedding_dim,
            spec.index,
            "; ".join(str(o) for o in info.overrides),
        )
        return Loaded(engine, batcher, loader, index)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for model in self.models:
            loaded, model.loaded, model.status = model.loaded, None, "unloaded"
            if loaded is not None:
                await asyncio.to_thread(_close, loaded)


def _close(loaded: Loaded) -> None:
    loaded.batcher.stop()
    loaded.engine.close()
    if loaded.index is not None:
        loaded.index.close()


def _check_kind(spec: ModelSpec, task: Task) -> None:
    """The checkpoint holds the kind of model the models file says, and a captioner has no
    index (an index searches matching embeddings)."""
    if spec.kind is not None and spec.kind != task:
        raise InvalidInputError(
            f"the models file says {spec.name!r} is kind = {spec.kind!r}, but its checkpoint "
            f"holds a {task!r} model; fix `kind` (or `source`)",
            loc=("models_file",),
        )
    if task == "caption" and spec.index is not None:
        raise InvalidInputError(
            f"{spec.name!r} is a captioner, and an index belongs to a matching model; drop its "
            "`index`",
            loc=("models_file",),
        )


def _unavailable(model: ServedModel) -> APIError:
    return APIError(
        503,
        f"the model {model.name!r} failed to load and is unavailable; the server log (and "
        "/v1/models) says why",
        code=ErrorCode.MODEL_UNAVAILABLE,
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
