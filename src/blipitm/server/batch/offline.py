"""A batch answered without a server (``blipitm batch run``): the server's app built in process,
one batch record that never expires, and its lines sent through the app as background work.

Shared by the local run and by every Ray actor of ``batch run --ray`` (``ray_lines.py``), so that
both answer each line with the same code as ``POST /v1/batches`` does: only where the answers
are written differs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from blipitm.engine.options import LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.server.account import SCOPE_BACKGROUND
from blipitm.server.batch.lines import Line
from blipitm.server.batch.runner import AnswerSink, send_lines
from blipitm.server.batch.store import Batch
from blipitm.server.middleware import ASGIApp

READY_POLL_S = 0.1
# The batcher's wait for more work before it runs a batch, as a server running batches sets it.
MAX_WAIT_MS = 5.0


def offline_batch(endpoint: str, source: str, total: int = 0) -> Batch:
    """The run's batch record: in progress, for ``total`` lines, and never expiring (an offline
    run has no completion window)."""
    batch = Batch("offline", None, endpoint, source, "24h", status="in_progress")
    batch.expires_at = math.inf  # type: ignore[assignment]
    batch.request_counts["total"] = total
    return batch


@asynccontextmanager
async def offline_app(options: LoadOptions) -> AsyncIterator[ASGIApp]:
    """The server's app for ``options``' model, without extensions (no keys, no Batch API: the
    lines are unmetered), entered once its model is loaded. A model that cannot load is an
    error naming ``model``, raised here instead of 503 on every line."""
    from blipitm.server.app import create_app, no_extensions
    from blipitm.server.settings import ServerSettings

    app = create_app(
        ServerSettings(load=options, max_wait_ms=MAX_WAIT_MS), extensions=no_extensions
    )
    async with app.router.lifespan_context(app):
        state = app.state.blipitm
        while not state.ready:
            if state.load_error is not None:
                raise InvalidInputError(state.load_error, loc=("model",))
            await asyncio.sleep(READY_POLL_S)
        yield app


async def answer_lines(
    app: ASGIApp,
    batch: Batch,
    lines: Iterator[Line],
    sink: AnswerSink,
    window: int,
    on_line: Callable[[], None] = lambda: None,
) -> None:
    """Send ``lines`` through ``app``, ``window`` in flight, as background work; each outcome
    goes to ``sink``, and ``on_line`` runs after each."""
    await send_lines(
        app, batch, lines, sink, {SCOPE_BACKGROUND: True}, window, asyncio.Event(), on_line
    )
