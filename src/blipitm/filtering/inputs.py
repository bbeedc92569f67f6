"""A run's inputs: paths, globs and brace ranges become :class:`Shard` records, one per file,
each with its :class:`~blipitm.filtering.formats.Format` and a unique output name."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.errors import InvalidInputError
from blipitm.filtering.formats import Format, format_of
from blipitm.filtering.readers import DEFAULT_COLUMNS, Columns, Sample


@dataclass(frozen=True)
class Shard:
    """One input file. ``name``: its outputs' stem, unique in the run."""

    path: str
    format: Format
    name: str = ""

    @property
    def kind(self) -> str:
        """The format's name, as the manifest records it."""
        return self.format.name

    def fingerprint(self) -> dict[str, Any]:
        st = os.stat(self.path)
        return {"path": os.path.abspath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00002}.tar`` -> the three names (zero padding kept), recursively."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    a, b = m[1], m[2]
    width = len(a) if a.startswith("0") else 0
    out = []
    for i in range(int(a), int(b) + 1):
        out += expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
    return out


def expand_inputs(patterns: Sequence[str]) -> list[Shard]:
    """Shards named by paths, globs and brace ranges, in the order given (globs sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            hits = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            if not hits or not all(os.path.isfile(h) for h in hits):
                raise InvalidInputError(f"no input file matches {name!r}", loc=("inputs",))
            paths += hits
    shards, seen = [], set()
    for path in paths:
        fmt = format_of(path)
        base = Path(path).name
        suffix = fmt.suffix_of(base)
        assert suffix is not None  # format_of matched the same ending
        stem = base[: -len(suffix)]
        name, n = stem, 1
        while name in seen:  # two inputs with one file name: keep outputs apart
            n += 1
            name = f"{stem}-{n}"
        seen.add(name)
        shards.append(Shard(path, fmt, name))
    if not shards:
        raise InvalidInputError("no inputs given", loc=("inputs",))
    return shards


def read_shard(
    shard: Shard, columns: Columns = DEFAULT_COLUMNS, *, load_images: bool = True
) -> Iterator[Sample]:
    """The shard's samples, streamed, by its format's reader. A table's image paths are read
    (regular files only, capped), unless ``load_images`` is false (then ``image`` is the path).

    A shard that is damaged as a whole (a truncated tar or gzip stream, an unbalanced CSV quote)
    raises ``tarfile.ReadError``, ``EOFError`` or ``csv.Error`` naming where; a bad sample is a
    ``status``."""
    return shard.format.read(shard.path, columns, load_images)
