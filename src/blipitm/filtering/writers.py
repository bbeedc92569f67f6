"""Kept samples out: WebDataset tars (original members untouched, plus ``KEY.scores.json``) for
tar inputs, Parquet (original columns plus the scores) for tables. Written atomically."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blipitm.common.files import atomic_write
from blipitm.filtering.readers import Sample


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


def write_kept_parquet(path: Path, kept: Iterable[tuple[Sample, dict[str, Any]]]) -> int:
    import pyarrow as pa

    rows = [{**sample.raw, **scores} for sample, scores in kept]
    write_parquet(path, pa.Table.from_pylist(rows))
    return len(rows)


def write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda f: pq.write_table(table, f))
