"""The one console renderer of progress (``blipitm.common.progress``): a tqdm bar per stage on a
terminal, a log line every ``LOG_EVERY_S`` otherwise (and at a stage's start and end)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LOG_EVERY_S = 30.0


class ConsoleProgress:
    """A ``Progress`` callback (stage, done, total, note=). Call :meth:`close` at the end.

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
        self._first = 0  # done when the stage started (work of earlier runs)

    def __call__(self, stage: str, done: int, total: int | None, /, *, note: str = "") -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._start, self._last_log = stage, time.monotonic(), 0.0
            self._first = done
            if self.bars:
                self._open_bar(stage, total)
        if self._bar is not None:
            if self._bar.total != total:
                self._bar.total = total  # an estimate may change until it is known
            self._bar.n = done
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if done in (0, total) or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            print(self._line(stage, done, total, now - self._start, note), file=self.stream)

    def _line(self, stage: str, done: int, total: int | None, elapsed: float, note: str) -> str:
        unit = f" {self.units[stage]}s" if stage in self.units else ""
        if total is None:
            line = f"{stage}: {done}{unit} ({elapsed:.0f} s)"
        else:
            pct = 100.0 * done / total if total else 100.0
            line = f"{stage}: {done}/{total}{unit} ({pct:.0f}%, {elapsed:.0f} s)"
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        if rate > 0 and (total is None or done < total):
            line += f", {rate:.1f}{unit or ' it'}/s"
            if total is not None:
                line += f", ETA {(total - done) / rate:.0f} s"
        return f"{line}; {note}" if note else line

    def _open_bar(self, stage: str, total: int | None) -> None:
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
