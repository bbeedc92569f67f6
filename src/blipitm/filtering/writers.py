"""Kept samples out, written atomically: WebDataset tars (original members untouched, plus
``KEY.scores.json``) for tar inputs; for tables the original columns plus the scores, in a schema
that does not depend on which rows a shard keeps, so that ``kept/`` reads as one dataset:

- Parquet inputs: Parquet in the input file's own Arrow schema (rows copied by Arrow, never
  through Python values), plus the score columns of :func:`kept_fields`;
- JSONL inputs: JSONL, each kept object with the score fields added (JSON fields may change
  type from row to row, which no Parquet column can hold);
- CSV-like inputs: Parquet, every column a string, plus the score columns.

Every writer has one signature, ``(path, kept) -> samples written``, so that
:mod:`blipitm.filtering.formats` can pair each with its reader.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.common.files import atomic_write
from blipitm.filtering.readers import Sample
from blipitm.filtering.scoring import SCORE_COLUMNS


@dataclass(frozen=True)
class Kept:
    """One shard's kept samples, as a writer needs them: by row number (for writers that copy
    rows from ``source`` themselves) or read again from the input (``samples``: lazy, so a
    writer that does not iterate it never reads the input through the reader)."""

    source: str  # the input file
    fields: Mapping[int, dict[str, Any]]  # sample number -> the score fields it gets
    samples: Iterable[tuple[Sample, dict[str, Any]]]  # the kept samples with their fields
    capfilt: bool = False  # the fields hold CapFilt's ``captions`` (see kept_fields)


def write_kept_tar(path: Path, kept: Kept) -> int:
    """Each sample's original members, then ``KEY.scores.json``; returns samples written."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample, scores in kept.samples:
                for info, data in sample.raw:  # read_tar's raw: the members [(TarInfo, bytes)]
                    tar.addfile(info, io.BytesIO(data))
                blob = json.dumps(scores, ensure_ascii=False).encode()
                info = tarfile.TarInfo(f"{sample.key}.scores.json")
                info.size = len(blob)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(blob))
                count += 1

    atomic_write(path, write)
    return count


def kept_fields(capfilt: bool = False) -> list[Any]:
    """The columns a kept table row gets (replacing input columns of the same names); a
    CapFilt run's also get ``captions``: each kept caption with its source and scores, the
    bootstrapped caption field."""
    import pyarrow as pa

    fields = [
        *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
        pa.field("caption_kept", pa.string()),
        pa.field("captions_kept", pa.list_(pa.string())),
    ]
    if capfilt:
        kept_caption = pa.struct(
            [
                pa.field("caption", pa.string()),
                pa.field("source", pa.string()),
                *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
            ]
        )
        fields.append(pa.field("captions", pa.list_(kept_caption)))
    return fields


def _with_scores(table: Any, fields: list[Any], scores: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    table = table.drop_columns([f.name for f in fields if f.name in table.column_names])
    for f in fields:
        table = table.append_column(f, pa.array([s[f.name] for s in scores], f.type))
    return table


def write_kept_parquet(path: Path, kept: Kept) -> int:
    """The kept rows of Parquet file ``kept.source``, copied by Arrow in its own schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = kept_fields(kept.capfilt)
    rows_kept: Mapping[int, dict[str, Any]] = kept.fields
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        with pq.ParquetFile(kept.source) as pf:
            base = pf.schema_arrow
            names = {x.name for x in fields}
            schema = pa.schema(
                [x for x in base if x.name not in names] + fields, metadata=base.metadata
            )
            with pq.ParquetWriter(f, schema) as writer:
                offset = 0
                for batch in pf.iter_batches(batch_size=256):
                    rows = [i for i in range(offset, offset + batch.num_rows) if i in rows_kept]
                    if rows:
                        t = pa.Table.from_batches([batch]).take([i - offset for i in rows])
                        t = _with_scores(t, fields, [rows_kept[i] for i in rows])
                        writer.write_table(t.cast(schema))
                        count += len(rows)
                    offset += batch.num_rows

    atomic_write(path, write)
    return count


def write_kept_jsonl(path: Path, kept: Kept) -> int:
    """Each kept object (``read_jsonl``'s raw: the row dict) with the score fields added."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for sample, scores in kept.samples:
            f.write(json.dumps({**sample.raw, **scores}, ensure_ascii=False).encode() + b"\n")
            count += 1

    atomic_write(path, write)
    return count


def write_kept_delimited(path: Path, kept: Kept, *, dialect: type[csv.Dialect]) -> int:
    """Kept CSV-like rows as Parquet: the header's columns as strings, plus the scores."""
    import pyarrow as pa

    with open(kept.source, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, dialect), [])
    fields = kept_fields(kept.capfilt)
    names = {x.name for x in fields}
    schema = pa.schema([pa.field(h, pa.string()) for h in header if h not in names] + fields)
    rows = [{**sample.raw, **scores} for sample, scores in kept.samples]
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))
    return len(rows)


def write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda f: pq.write_table(table, f))
