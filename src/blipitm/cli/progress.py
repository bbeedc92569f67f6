"""Progress display for long commands: a tqdm bar per stage on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LOG_EVERY_S = 30.0


class ConsoleProgress:
    """A ``Progress`` callback (stage, done, total). Call :meth:`close` at the end."""

    def __init__(self, stream: TextIO | None = None, *, bars: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self._stage: str | None = None
        self._bar: Any = None
        self._last_log = 0.0
        self._start = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._start, self._last_log = stage, time.monotonic(), 0.0
            if self.bars:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=stage, file=self.stream, dynamic_ncols=True)
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()
            return
        now = time.monotonic()
        if done in (0, total) or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            pct = 100.0 * done / total if total else 100.0
            elapsed = now - self._start
            print(f"{stage}: {done}/{total} ({pct:.0f}%, {elapsed:.0f} s)", file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None
