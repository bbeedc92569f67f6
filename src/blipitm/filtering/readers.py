"""Input shards: WebDataset tars as img2dataset writes them, and Parquet / JSONL / CSV tables.

A shard yields :class:`Sample` records in order, one at a time (memory does not grow with the
shard). An image is handed on undecoded (its bytes, or a path the engine reads on its decode
threads); a sample that cannot be scored carries a ``status`` instead of being dropped.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipitm.errors import InvalidInputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TABLE_KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}
# img2dataset's parquet layout first, then common names.
IMAGE_COLS = ("jpg", "png", "webp", "image", "image_path", "path")
CAPTION_COL = "caption"
ID_COLS = ("key", "id")


@dataclass
class Sample:
    """One input sample. ``image``: bytes or a path (None when missing); ``captions``: the
    candidate captions (one for a plain caption, several for CapFilt lists)."""

    key: str
    image: bytes | str | None
    captions: list[str]
    status: str = "ok"  # "ok", or why the sample has no score
    error: str = ""
    raw: Any = None  # the original fields: tar members [(TarInfo, bytes)] or a table row dict


@dataclass(frozen=True)
class Columns:
    image: str | None = None
    caption: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Shard:
    path: str
    kind: str  # "tar", "parquet", "jsonl" or "csv"
    name: str = field(default="")  # unique output stem

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


def kind_of(path: str) -> str:
    if path.endswith(".tar"):
        return "tar"
    kind = TABLE_KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise InvalidInputError(
            f"{path}: not a WebDataset .tar or a .parquet/.jsonl/.csv table", loc=("inputs",)
        )
    return kind


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
        stem = Path(path).name.rsplit(".", 1)[0]
        name, n = stem, 1
        while name in seen:  # two inputs with one file name: keep outputs apart
            n += 1
            name = f"{stem}-{n}"
        seen.add(name)
        shards.append(Shard(path, kind_of(path), name))
    if not shards:
        raise InvalidInputError("no inputs given", loc=("inputs",))
    return shards


def read_shard(shard: Shard, columns: Columns = Columns()) -> Iterator[Sample]:
    if shard.kind == "tar":
        yield from _read_tar(shard.path, columns)
        return
    base = os.path.dirname(os.path.abspath(shard.path))
    for i, row in enumerate(_rows(shard)):
        yield _table_sample(row, i, base, columns)


# -- WebDataset ---------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _read_tar(path: str, columns: Columns) -> Iterator[Sample]:
    """Members grouped by key (consecutive, as webdataset requires), streamed."""
    key: str | None = None
    group: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, _ = _split_name(info.name)
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if key is not None and k != key:
                yield _tar_sample(key, group, columns)
                group = []
            key = k
            group.append((info, data))
    if key is not None:
        yield _tar_sample(key, group, columns)


def _tar_sample(key: str, members: list[tuple[tarfile.TarInfo, bytes]], cols: Columns) -> Sample:
    fields = {_split_name(info.name)[1]: data for info, data in members}
    image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if cols.image is not None:
        image = fields.get(cols.image)
    sample = Sample(key, image, [], raw=members)
    if cols.caption is not None:  # a field of KEY.json: a string or a list of candidates
        try:
            meta = json.loads(fields.get("json", b"{}"))
        except ValueError as e:
            return _bad(sample, "bad_caption", f"{key}.json is not JSON: {e}")
        set_captions(sample, meta.get(cols.caption) if isinstance(meta, dict) else None)
    elif "txt" in fields:
        set_captions(sample, fields["txt"].decode("utf-8", errors="replace"))
    else:
        _bad(sample, "no_caption", f"no {key}.txt")
    if image is None and sample.status == "ok":
        _bad(sample, "missing_image", f"no image member ({'/'.join(IMAGE_EXTS)}) for {key}")
    return sample


# -- tables -------------------------------------------------------------------------------


def _rows(shard: Shard) -> Iterator[dict[str, Any]]:
    if shard.kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(shard.path) as pf:
            for batch in pf.iter_batches(batch_size=256):
                yield from batch.to_pylist()
    elif shard.kind == "jsonl":
        with open(shard.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = {"__error__": f"line {line_no} is not JSON: {e}"}
                yield (
                    row
                    if isinstance(row, dict)
                    else {"__error__": f"line {line_no}: not an object"}
                )
    else:
        with open(shard.path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)


def _pick(row: dict[str, Any], name: str | None, defaults: Sequence[str]) -> str | None:
    if name is not None:
        return name
    return next((c for c in defaults if c in row), None)


def _table_sample(row: dict[str, Any], i: int, base: str, cols: Columns) -> Sample:
    id_col = _pick(row, cols.id, ID_COLS)
    key = str(row[id_col]) if id_col is not None and row.get(id_col) is not None else str(i)
    sample = Sample(key, None, [], raw=row)
    if "__error__" in row:
        return _bad(sample, "bad_row", row["__error__"])
    set_captions(sample, row.get(cols.caption or CAPTION_COL))
    image_col = _pick(row, cols.image, IMAGE_COLS)
    cell = row.get(image_col) if image_col is not None else None
    if isinstance(cell, dict):  # Hugging Face datasets' Image struct
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)) and cell:
        sample.image = bytes(cell)
    elif isinstance(cell, str) and cell:
        sample.image = cell if os.path.isabs(cell) else os.path.join(base, cell)
    elif sample.status == "ok":
        _bad(sample, "missing_image", f"row {i} has no image in column {image_col!r}")
    return sample


def set_captions(sample: Sample, cell: Any) -> None:
    if isinstance(cell, str) and cell.startswith("["):  # a list written as JSON text (CSV)
        with contextlib.suppress(ValueError):
            cell = json.loads(cell)
    if isinstance(cell, str):
        cell = [cell]
    if not isinstance(cell, (list, tuple)) or not cell:
        _bad(sample, "no_caption", "no caption")
        return
    if not all(isinstance(c, str) for c in cell):
        _bad(sample, "bad_caption", "captions must be strings")
        return
    sample.captions = list(cell)


def _bad(sample: Sample, status: str, error: str) -> Sample:
    sample.status, sample.error = status, error
    return sample
