"""A budget of decoded pixels in flight, shared by the threads that decode images.

A full-size image costs memory in proportion to its pixels (Pillow keeps RGB as 4 bytes per
pixel), whatever its file size: a 120 kB PNG can decode to 144 MB. Each decode reserves its pixel
count (read from the file header) before decoding and gives it back once the image has been
resized to the model's input, so the full-size pixels held at once never exceed the budget,
however many images are queued. Work over the budget waits; one image larger than the whole
budget could never run and is refused.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from blipitm.errors import ImageTooLargeError, Loc


class PixelBudget:
    """At most ``max_pixels`` reserved at once; reservations are granted first come, first served.

    First come, first served (a queue rather than "whoever fits") so that a large image is never
    starved by a stream of small ones. ``setting`` names the knob in error messages. Thread-safe.
    """

    def __init__(self, max_pixels: int, *, setting: str) -> None:
        if max_pixels < 1:
            raise ValueError(f"a pixel budget must be >= 1, got {max_pixels}")
        self.max_pixels = max_pixels
        self.setting = setting
        self._in_use = 0
        self._waiting: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def reserve(self, pixels: int, *, loc: Loc = ("image",)) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block, waiting until they are free.

        Raises :class:`ImageTooLargeError` (naming ``loc``) if ``pixels`` exceeds the budget.
        """
        if pixels > self.max_pixels:
            raise ImageTooLargeError(
                f"image is {pixels} pixels, more than the {self.max_pixels} decoded pixels "
                f"allowed in flight at once ({self.setting}); send a smaller image or raise "
                f"{self.setting}",
                loc=loc,
            )
        me = object()
        with self._cond:
            self._waiting.append(me)
            try:
                self._cond.wait_for(
                    lambda: self._waiting[0] is me and self._in_use + pixels <= self.max_pixels
                )
            finally:  # granted or interrupted: either way the next in line may go now
                self._waiting.remove(me)
                self._cond.notify_all()
            self._in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= pixels
                self._cond.notify_all()
