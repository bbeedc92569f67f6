"""Give freed heap memory back to the operating system between batches of a long run.

glibc's malloc keeps freed memory for reuse instead of returning it; with many threads and
allocation sizes that vary batch to batch (decoded images, packed text of varying length,
image-cache entries evicted and replaced), the resident size of a filtering run then creeps up
with the number of samples instead of staying flat (BENCHMARKS.md, "Dataset filtering").
``malloc_trim(0)`` returns the free pages of every arena, including those inside the heap; it
takes milliseconds (tens on a large, fragmented heap), against the seconds a batch of base-size
scoring takes. Elsewhere than glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


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
