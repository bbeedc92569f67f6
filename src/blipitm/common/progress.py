"""Progress reporting shared by index builds and evaluation runs."""

from __future__ import annotations

from collections.abc import Callable

# ``progress(stage, done, total)``: called with done=0 when a stage starts and after every
# committed batch, so a callback that raises (Ctrl-C, a test) never loses finished work.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: report nothing."""
