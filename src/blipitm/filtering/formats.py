"""The input formats, in one table: which files each one is, how its samples are read, how its
kept samples are written. Everything else (the inputs' names, the manifest, the kept outputs,
``blipitm filter --help``) reads :data:`FORMATS`, so a new format is one entry here.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from blipitm.errors import InvalidInputError
from blipitm.filtering.readers import (
    Columns,
    Sample,
    Tsv,
    read_delimited,
    read_jsonl,
    read_parquet,
    read_tar,
)
from blipitm.filtering.writers import (
    Kept,
    write_kept_delimited,
    write_kept_jsonl,
    write_kept_parquet,
    write_kept_tar,
)

Reader = Callable[[str, Columns, bool], Iterator[Sample]]  # (path, columns, load_images)
KeptWriter = Callable[[Path, Kept], int]  # (path, kept) -> samples written


@dataclass(frozen=True)
class Format:
    """One input format. ``read`` and ``write_kept`` are a pair: the writer is the one reader
    of the :attr:`Sample.raw` its reader makes."""

    name: str  # the manifest's "kind" of an input
    label: str  # how --help and messages name it
    suffixes: tuple[str, ...]  # the file name endings it reads, lower case
    read: Reader
    write_kept: KeptWriter
    kept_suffix: str  # of kept/NAME<suffix>

    def suffix_of(self, path: str) -> str | None:
        """The ending of ``path`` (case as written) that makes it this format, or None."""
        lower = path.lower()
        n = next((len(s) for s in self.suffixes if lower.endswith(s)), None)
        return None if n is None else path[-n:]


FORMATS: tuple[Format, ...] = (
    Format("tar", "WebDataset", (".tar", ".tar.gz", ".tgz"), read_tar, write_kept_tar, ".tar"),
    Format("parquet", "Parquet", (".parquet",), read_parquet, write_kept_parquet, ".parquet"),
    Format("jsonl", "JSONL", (".jsonl",), read_jsonl, write_kept_jsonl, ".jsonl"),
    Format(
        "csv",
        "CSV",
        (".csv",),
        partial(read_delimited, dialect=csv.excel),
        partial(write_kept_delimited, dialect=csv.excel),
        ".parquet",
    ),
    Format(
        "tsv",
        "TSV",
        (".tsv",),
        partial(read_delimited, dialect=Tsv),
        partial(write_kept_delimited, dialect=Tsv),
        ".parquet",
    ),
)


def described() -> str:
    """The formats as --help and messages list them: ``WebDataset (.tar, .tar.gz, ...), ...``."""
    return ", ".join(f"{f.label} ({', '.join(f.suffixes)})" for f in FORMATS)


def format_of(path: str) -> Format:
    """The format that reads ``path``, by its name's ending."""
    found = next((f for f in FORMATS if f.suffix_of(path) is not None), None)
    if found is None:
        raise InvalidInputError(
            f"{path}: not a file of a known format: {described()}", loc=("inputs",)
        )
    return found
