"""The console progress of long commands: bars on a terminal that log lines never land inside."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

from blipitm.cli.progress import ConsoleProgress


class Terminal(io.StringIO):
    """What a terminal is sent; :meth:`screen` is what it shows (``\\r`` returns the cursor)."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        lines, col = [""], 0
        for ch in self.getvalue():
            if ch == "\n":
                lines.append("")
                col = 0
            elif ch == "\r":
                col = 0
            else:
                line = lines[-1].ljust(col)
                lines[-1] = line[:col] + ch + line[col + 1 :]
                col += 1
        return [line.rstrip() for line in lines if line.strip()]


@contextlib.contextmanager
def terminal_stderr() -> Iterator[Terminal]:
    """stderr is a terminal, with a console log handler on it as ``blipitm``'s CLI installs.

    A context manager, not a fixture: pytest puts its own ``sys.stderr`` back between phases.
    """
    term, saved = Terminal(), sys.stderr
    sys.stderr = term
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield term
    finally:
        root.removeHandler(handler)
        sys.stderr = saved


def test_log_lines_do_not_land_inside_a_bar() -> None:
    with terminal_stderr() as terminal:
        progress = ConsoleProgress()
        assert progress.bars
        progress("index", 0, 4)
        progress("index", 1, 4)
        logging.getLogger("blipitm.retrieval").warning("skipped broken.jpg: not an image")
        progress("index", 4, 4)
        progress.close()
        screen = terminal.screen()
        # After the bar is gone, log lines go straight to the console handler again.
        logging.getLogger("blipitm").warning("after")
    assert "WARNING blipitm.retrieval: skipped broken.jpg: not an image" in screen, screen
    assert any(line.startswith("index: 100%") and "4/4" in line for line in screen), screen
    assert terminal.getvalue().endswith("WARNING blipitm: after\n")


def test_bar_counts_the_stage_unit() -> None:
    with terminal_stderr() as terminal:
        progress = ConsoleProgress(units={"itm": "pair"})
        progress("itm", 0, 10)
        progress("itm", 10, 10)
        progress("other", 0, 1)
        progress.close()
    bars = terminal.screen()
    assert any(line.startswith("itm: 100%") and "pair/s" in line for line in bars), bars
    assert any(line.startswith("other:") and "it/s" in line for line in bars), bars


def test_log_lines_without_a_terminal_name_the_unit() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(out, units={"itm": "pair"})
    progress("itm", 0, 10)
    progress("itm", 10, 10)
    assert out.getvalue().splitlines()[-1].startswith("itm: 10/10 pairs (100%")


def test_unknown_total_and_note_in_log_lines() -> None:
    out = io.StringIO()
    progress = ConsoleProgress(out, units={"filter": "sample"})
    progress("filter", 0, None, note="shards 0/2 done")
    assert out.getvalue().splitlines()[-1].startswith("filter: 0 samples (")
    assert out.getvalue().splitlines()[-1].endswith("; shards 0/2 done")
    progress("filter", 4, 4, note="shards 2/2 done")
    assert out.getvalue().splitlines()[-1].startswith("filter: 4/4 samples (100%")


def test_filter_records_render_through_the_one_console() -> None:
    from blipitm.cli.filter import _Printer
    from blipitm.filtering import FilterProgress

    with terminal_stderr() as terminal:
        printer = _Printer()
        printer(FilterProgress(0, 2, "a.tar", 3, 0, 0, 1.0, pairs=6))
        printer(FilterProgress(1, 2, "b.tar", 8, 2, 2, 2.0, pairs=16, samples_expected=8))
        printer.close()
    screen = terminal.screen()
    assert any(
        line.startswith("filter: 100%") and "8/8" in line and "shards 2/2 done" in line
        for line in screen
    ), screen
