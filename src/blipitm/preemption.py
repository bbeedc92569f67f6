"""Yield points: where a long engine call lets more urgent work run first.

The model's layer loops call :func:`yield_point` between two layers. It does nothing unless the
calling thread has installed a handler with :func:`yielding_to`. The inference worker
(:class:`blipitm.engine.batcher.Batcher`) does while it runs a batch of background work (the
Batch API's lines): its handler runs the online jobs queued meanwhile, to completion and with no
yield points of their own, and then the background call goes on where it was. So an online
request waits for one layer of background work, not for a whole background batch; the one
thread calling the model stays the only one. A call that keeps state on the model across layers
(Grad-CAM's attention probe) runs under ``yielding_to(None)``.

Torch-free, below every layer that runs a model, so that the batcher (torch-free too) installs
what the model calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_thread = threading.local()


def yield_point() -> None:
    """Between two layers: let this thread's handler, if any, run more urgent work now."""
    handler: Callable[[], None] | None = getattr(_thread, "handler", None)
    if handler is not None:
        handler()


@contextlib.contextmanager
def yielding_to(handler: Callable[[], None] | None) -> Iterator[None]:
    """Within the block, this thread's yield points call ``handler`` (None: do nothing)."""
    before = getattr(_thread, "handler", None)
    _thread.handler = handler
    try:
        yield
    finally:
        _thread.handler = before
