"""Kept samples out, written atomically: WebDataset tars (original members untouched, plus
``KEY.scores.json``) for tar inputs; for tables the original columns plus the scores, in a schema
that does not depend on which rows a shard keeps, so that ``kept/`` reads as one dataset:

- Parquet inputs: Parquet in the input file's own Arrow schema (rows copied by Arrow, never
  through Python values), plus the score columns of :data:`KEPT_FIELDS`;
- JSONL inputs: JSONL, each kept object with the score fields added (JSON fields may change
  type from row to row, which no Parquet column can hold);
- CSV inputs: Parquet, every CSV column a string, plus the score columns.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from blipitm.common.files import atomic_write
from blipitm.filtering.readers import Sample
from blipitm.filtering.scoring import SCORE_COLUMNS


def write_kept_tar(path: Path, kept: Iterable[tuple[Sample, dict[str, Any]]]) -> int:
    """Each sample's original members, then ``KEY.scores.json``; returns samples written."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample, scores in kept:
                for info, data in sample.raw:
                    tar.addfile(info, io.BytesIO(data))
                blob = json.dumps(scores, ensure_ascii=False).encode()
                info = tarfile.TarInfo(f"{sample.key}.scores.json")
                info.size = len(blob)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(blob))
                count += 1

    atomic_write(path, write)
    return count


def kept_fields() -> list[Any]:
    """The columns a kept table row gets (replacing input columns of the same names)."""
    import pyarrow as pa

    return [
        *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
        pa.field("caption_kept", pa.string()),
        pa.field("captions_kept", pa.list_(pa.string())),
    ]


def _with_scores(table: Any, fields: list[Any], scores: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    table = table.drop_columns([f.name for f in fields if f.name in table.column_names])
    for f in fields:
        table = table.append_column(f, pa.array([s[f.name] for s in scores], f.type))
    return table


def write_kept_parquet(path: Path, source: str, kept: Mapping[int, dict[str, Any]]) -> int:
    """Rows ``kept`` (row number -> its score fields) of Parquet file ``source``, in its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = kept_fields()
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        with pq.ParquetFile(source) as pf:
            base = pf.schema_arrow
            names = {x.name for x in fields}
            schema = pa.schema(
                [x for x in base if x.name not in names] + fields, metadata=base.metadata
            )
            with pq.ParquetWriter(f, schema) as writer:
                offset = 0
                for batch in pf.iter_batches(batch_size=256):
                    rows = [i for i in range(offset, offset + batch.num_rows) if i in kept]
                    if rows:
                        t = pa.Table.from_batches([batch]).take([i - offset for i in rows])
                        t = _with_scores(t, fields, [kept[i] for i in rows])
                        writer.write_table(t.cast(schema))
                        count += len(rows)
                    offset += batch.num_rows

    atomic_write(path, write)
    return count


def write_kept_jsonl(path: Path, kept: Iterable[tuple[Sample, dict[str, Any]]]) -> int:
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for sample, scores in kept:
            f.write(json.dumps({**sample.raw, **scores}, ensure_ascii=False).encode() + b"\n")
            count += 1

    atomic_write(path, write)
    return count


def write_kept_csv(path: Path, source: str, kept: Iterable[tuple[Sample, dict[str, Any]]]) -> int:
    """Kept CSV rows as Parquet: the header's columns as strings, plus the scores."""
    import csv

    import pyarrow as pa

    with open(source, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    fields = kept_fields()
    names = {x.name for x in fields}
    schema = pa.schema([pa.field(h, pa.string()) for h in header if h not in names] + fields)
    rows = [{**sample.raw, **scores} for sample, scores in kept]
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))
    return len(rows)


def write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda f: pq.write_table(table, f))
