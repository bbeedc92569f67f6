"""One shape for a benchmark's section of BENCHMARKS.md: title, machine, load, note, table."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

from run import cpu_flags

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def section(
    title: str, note: str, rows: Sequence[tuple[str, str]], load_at_start: float
) -> list[str]:
    """The section's lines: the machine and its CPU flags, the 1-minute load average at the
    start (``load_at_start``, from ``os.getloadavg()``) and now, ``note``, and the rows."""
    return [
        "",
        f"## {title}",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"CPU flags: {cpu_flags()}",
        f"- 1-minute load average at start / end: {load_at_start:.2f} / {os.getloadavg()[0]:.2f}",
        f"- {note}",
        "",
        "| case | result |",
        "|---|---|",
        *(f"| {case} | {value} |" for case, value in rows),
    ]


def emit(lines: list[str], *, write: bool) -> None:
    """Print the section; with ``write``, append it to BENCHMARKS.md too."""
    print("\n".join(lines))
    if write:
        with open(BENCHMARKS, "a") as f:
            f.write("\n".join(lines) + "\n")
