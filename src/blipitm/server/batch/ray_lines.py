"""``blipitm batch run --ray``: a batch's lines answered by a pool of Ray actors.

The driver (the command) checks the file and reads back what is already answered, as a local run
does, then cuts the lines still to answer into chunks of ``chunk_lines`` and hands each chunk to
an actor. An actor loads the model once, into the same in-process app as a local run
(``offline.py``), answers its chunk ``window`` lines at a time and returns each line's outcome,
its status and body. The driver writes them through its own :class:`~.runner.Answers` as each
chunk comes back, so the answer lines are made and filed as in a local run, and an interrupted
run loses at most the chunks in flight: a rerun resumes from the output files.

Why Ray actors with the lines in the chunks, not Ray Data over the input file: the lines travel
in Ray's object store, so the input need only be on the driver's machine (a ``ray://`` client's
too), and the driver reads the file as it goes: at most :data:`IN_FLIGHT` chunks per actor are
read and not yet answered, whatever the file's size. The filter hands Ray Data whole shards
instead because its actors write the outputs themselves, next to inputs they read from shared
storage.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from blipitm.common.ray_cluster import RayPool, ray_cluster
from blipitm.engine.options import LoadOptions
from blipitm.errors import BlipitmError
from blipitm.server.batch.lines import Line
from blipitm.server.batch.offline import answer_lines, offline_app, offline_batch
from blipitm.server.batch.runner import Answers
from blipitm.server.middleware import ASGIApp

# Chunks handed to one actor at a time: one it answers and the next, waiting, so that an actor
# never waits on the driver between chunks.
IN_FLIGHT = 2
# A Ray actor that dies (its node lost, killed for memory) is started again once, and the chunk
# it held is answered again by the new one: none of its answers had been written yet.
ACTOR_RESTARTS = 1

# (line number, custom_id, status, body) of one answered line; status None: never sent (the
# batch expired), which an offline batch never does but the runner's contract allows.
Outcome = tuple[int, str, int | None, Any]


class _Outcomes:
    """The runner's answer sink inside an actor: the outcomes, in the order they came."""

    def __init__(self) -> None:
        self.rows: list[Outcome] = []

    def add(self, line: Line, status: int, body: Any) -> None:
        self.rows.append((line.number, line.custom_id, status, body))

    def expire(self, line: Line) -> None:
        self.rows.append((line.number, line.custom_id, None, None))


class LineAnswerer:
    """A Ray actor answering chunks of a batch's lines through the server's app, in process.

    An async actor: its calls run on one event loop, which the app (its model loaded once, on
    :meth:`start`) lives on from one chunk to the next.
    """

    def __init__(self, options: LoadOptions, endpoint: str, window: int) -> None:
        from blipitm.common.memory import apply_memory_policy

        apply_memory_policy()  # the actor is its own process: an entry point like the CLI's
        self.options, self.endpoint, self.window = options, endpoint, window
        self._app: ASGIApp | None = None
        self._open = contextlib.AsyncExitStack()  # the app's lifespan, closed with the actor

    async def start(self) -> None:
        """Load the model, once (an actor Ray restarts loads it again on its next call)."""
        if self._app is None:
            self._app = await self._open.enter_async_context(offline_app(self.options))

    async def answer(self, lines: list[Line]) -> list[Outcome]:
        """Every line's outcome, in the order they were answered."""
        await self.start()
        assert self._app is not None
        outcomes = _Outcomes()
        batch = offline_batch(self.endpoint, "ray", len(lines))
        await answer_lines(self._app, batch, iter(lines), outcomes, self.window)
        return outcomes.rows


def answer_on_ray(
    lines: Iterator[Line],
    answers: Answers,
    pool: RayPool,
    options: LoadOptions,
    endpoint: str,
    *,
    window: int,
    chunk_lines: int,
    on_chunk: Callable[[], None] = lambda: None,
) -> None:
    """Answer ``lines`` on ``pool``'s actors, ``chunk_lines`` per task; the outcomes go to
    ``answers`` as each chunk comes back, and ``on_chunk`` runs after each (progress)."""
    with ray_cluster(pool) as cpus_per_worker:
        actors = _start_actors(pool, options, endpoint, window, cpus_per_worker)
        try:
            _drive(actors, _chunks(lines, chunk_lines), answers, on_chunk)
        finally:
            _stop(actors)


def _start_actors(
    pool: RayPool, options: LoadOptions, endpoint: str, window: int, cpus: float
) -> list[Any]:
    """``pool.workers`` actors with their model loaded: a model no actor can load is one error
    before any line is sent, as in a local run."""
    import ray

    actor_class = ray.remote(LineAnswerer).options(
        num_cpus=cpus,
        num_gpus=pool.gpus_per_worker,
        max_concurrency=1,  # one chunk at a time: ``window`` bounds the lines in flight
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
    )
    actors: list[Any] = [  # handles: Ray's stubs do not type their methods' .remote
        actor_class.remote(pool.actor_options(options), endpoint, window)
        for _ in range(pool.workers)
    ]
    try:
        _get([actor.start.remote() for actor in actors])
    except BaseException:
        _stop(actors)
        raise
    return actors


def _drive(
    actors: list[Any],
    chunks: Iterator[list[Line]],
    answers: Answers,
    on_chunk: Callable[[], None],
) -> None:
    """Keep :data:`IN_FLIGHT` chunks on every actor until the lines run out; write each chunk's
    outcomes as it comes back, whichever actor finishes first."""
    free = [actor for _ in range(IN_FLIGHT) for actor in actors]
    running: dict[Any, Any] = {}  # the task's result -> its actor
    for chunk in chunks:
        if not free:
            free.append(_collect(running, answers))
            on_chunk()
        actor = free.pop()
        running[actor.answer.remote(chunk)] = actor
    while running:
        _collect(running, answers)
        on_chunk()


def _collect(running: dict[Any, Any], answers: Answers) -> Any:
    """Wait for the first chunk to come back, write its outcomes; the actor that answered it."""
    import ray

    [ref], _ = ray.wait(list(running), num_returns=1)
    actor = running.pop(ref)
    for number, custom_id, status, body in _get(ref):
        line = Line(number, custom_id, b"")  # an answer names its line; the body stayed there
        if status is None:
            answers.expire(line)
        else:
            answers.add(line, status, body)
    return actor


def _get(refs: Any) -> Any:
    """``ray.get``, with an error of ours raised as itself (``blipitm: error: model: ...``)
    rather than wrapped in Ray's traceback, and a lost actor explained."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BlipitmError):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        raise BlipitmError(
            f"a Ray worker died ({e}); the lines answered so far are written: run the same "
            "command again to answer the rest"
        ) from None


def _stop(actors: list[Any]) -> None:
    """Free the actors' CPUs and memory now: a Ray this run joined goes on without them."""
    import ray

    for actor in actors:
        ray.kill(actor)


def _chunks(lines: Iterator[Line], size: int) -> Iterator[list[Line]]:
    """``lines`` in lists of ``size`` (the last one shorter), read as they are asked for."""
    while chunk := list(itertools.islice(lines, size)):
        yield chunk
