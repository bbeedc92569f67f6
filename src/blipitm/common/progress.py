"""The one progress protocol of long runs (index builds, evaluation, dataset filtering).

``progress(stage, done, total)``: ``stage`` names what is counted (``"index"``, ``"itm"``,
``"filter"``), ``done`` how many are finished, ``total`` how many there will be (None while it is
not known yet). It is called with done=0 (or what earlier runs finished) when a stage starts and
after every committed batch, so a callback that raises (Ctrl-C, a test) never loses finished work.
A caller may add ``note=``, a short line of what the count does not say (``"shards 3/8 done"``).
The one console renderer is ``blipitm.cli.progress.ConsoleProgress``.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None, /, *, note: str = "") -> None: ...


def no_progress(stage: str, done: int, total: int | None, /, *, note: str = "") -> None:
    """The default callback: report nothing."""
