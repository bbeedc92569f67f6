"""The process's memory policy: what an entry point (the CLI, the server, a filtering run) sets
once so that a long run's resident size follows its work, not its history.

Both settings are process-wide, so no library constructor makes them: a program embedding
blipitm keeps its own allocator settings unless it calls :func:`apply_memory_policy`.

- Pillow's block size (:func:`apply_memory_policy`, once at start-up): large images come in one
  block that goes back to the OS when freed.
- ``malloc_trim`` (:func:`release_free_memory`, between batches): glibc keeps freed memory for
  reuse instead of returning it; with many threads and allocation sizes that vary batch to batch
  (decoded images, packed text of varying length, image-cache entries evicted and replaced), the
  resident size of a filtering run then creeps up with the number of samples instead of staying
  flat (BENCHMARKS.md, "Dataset filtering"). ``malloc_trim(0)`` returns the free pages of every
  arena, including those inside the heap, in far less time than a batch of scoring takes.
  Elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

# Pillow allocates an image in blocks of 16 MiB. glibc serves allocations under 32 MiB from
# per-thread arenas and keeps them after they are freed, so with N decode threads the resident
# memory grows to about N full-size images even while a budget lets two decode at a time (seen:
# +572 MB with 4 threads, where two 6000x6000 images take 288 MB). In one block per image, a
# large image is one allocation that glibc mmaps and unmaps when freed (+296 MB). Small images
# still come from the arenas, bounded by glibc's 32 MiB threshold per thread. Torch's
# allocations are not affected.
_RETURNABLE_BLOCK_BYTES = 1 << 30


def apply_memory_policy() -> None:
    """Set the process-wide memory policy; called once by each entry point, never on import.

    Makes Pillow allocate large images in blocks that go back to the OS when freed, so that a
    decode budget (the engine's ``decode_budget_pixels``, the server's ``--max-decoded-pixels``)
    bounds the resident memory too. A ``PILLOW_BLOCK_SIZE`` set in the environment is respected.
    """
    from PIL import Image  # here: the CLI's ``--help`` does not pay for Pillow

    if "PILLOW_BLOCK_SIZE" in os.environ:
        return
    if Image.core.get_block_size() < _RETURNABLE_BLOCK_BYTES:
        Image.core.set_block_size(_RETURNABLE_BLOCK_BYTES)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the symbols already loaded into this process, libc's among them
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True if the C library could do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
