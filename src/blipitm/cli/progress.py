"""Progress display for long commands: a tqdm bar per stage on a terminal, log lines otherwise."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LOG_EVERY_S = 30.0


class ConsoleProgress:
    """A ``Progress`` callback (stage, done, total). Call :meth:`close` at the end.

    ``units`` names what each stage counts (``{"itm": "pair"}``); tqdm's default is "it".
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        bars: bool | None = None,
        units: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.units = dict(units or {})
        self._stage: str | None = None
        self._bar: Any = None
        self._live = contextlib.ExitStack()  # undoes what a live bar changed
        self._last_log = 0.0
        self._start = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._start, self._last_log = stage, time.monotonic(), 0.0
            if self.bars:
                self._open_bar(stage, total)
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()
            return
        now = time.monotonic()
        if done in (0, total) or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            pct = 100.0 * done / total if total else 100.0
            elapsed = now - self._start
            unit = f" {self.units[stage]}s" if stage in self.units else ""
            print(f"{stage}: {done}/{total}{unit} ({pct:.0f}%, {elapsed:.0f} s)", file=self.stream)

    def _open_bar(self, stage: str, total: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # A log record written straight to the terminal would land inside the bar's line; while
        # the bar is live, console log handlers write through tqdm, which clears and redraws it.
        self._live.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        unit = self.units.get(stage, "it")
        self._bar = tqdm(total=total, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._live.close()
        self._stage = None
