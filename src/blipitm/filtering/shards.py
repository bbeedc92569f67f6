"""Stage 1 of a filtering run, shared by the local and the Ray runner: score one shard into
``scores/NAME.parquet`` and commit it with ``NAME.done.json``, and keep the run's tally (which
shards are done, samples and pairs scored, progress reports).

A shard is scored into a temporary file and renamed into place before its done marker is
written, so a marker always means a complete score file and an interrupted shard is redone whole.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipitm.common.files import atomic_write_json, fsync_dir
from blipitm.common.safeio import loads_json, read_regular_file
from blipitm.errors import BlipitmError, InvalidInputError
from blipitm.filtering.capfilt import Captioning, row_sources
from blipitm.filtering.inputs import Shard, read_shard
from blipitm.filtering.readers import Columns, Sample
from blipitm.filtering.scoring import SCORE_COLUMNS, score_batch
from blipitm.filtering.stats import Throughput

if TYPE_CHECKING:
    from blipitm.engine import Engine

log = logging.getLogger("blipitm.filter")


class FilterError(BlipitmError):
    """The output folder belongs to another run (inputs, model or options differ)."""


@dataclass(frozen=True)
class FilterProgress:
    """Sent after every scored batch, by the local and the Ray runner alike."""

    shard: int  # index of the shard the batch came from
    shards: int
    name: str
    samples: int  # samples scored in this run so far (all shards)
    shards_done: int  # shards finished (this run and earlier ones)
    shards_this_run: int  # shards finished in this run
    elapsed_s: float
    pairs: int = 0  # pairs scored in this run so far
    # Samples this run will score in all: known once a shard has finished (earlier runs count),
    # estimated as the shards left times the mean shard size; None before that.
    samples_expected: int | None = None

    @property
    def eta_s(self) -> float | None:
        if self.samples_expected is None or not self.samples:
            return None
        rate = self.samples / max(self.elapsed_s, 1e-9)
        return max(self.samples_expected - self.samples, 0) / rate


OnProgress = Callable[[FilterProgress], None]


@dataclass
class RunTotals:
    scored: list[Shard]
    errors: list[dict[str, str]]
    samples: int = 0
    pairs: int = 0
    seconds: float = 0.0

    def throughput(self) -> Throughput:
        return Throughput.of(self.samples, self.pairs, self.seconds)


class Tally:
    """Stage 1's bookkeeping, shared by the local and the Ray runner: which shards are done
    (by their done markers), what each batch adds, and the progress reports."""

    def __init__(self, shards: Sequence[Shard], out: Path, progress: OnProgress | None) -> None:
        self.shards = list(shards)
        self.progress = progress
        self.run = RunTotals([], [])
        self.start = time.monotonic()
        self.done: dict[int, int] = {}  # shard index -> its samples, once finished
        for k, shard in enumerate(self.shards):
            samples = committed_samples(out / "scores", shard)
            if samples is not None:
                self.done[k] = samples
        self.pending = [k for k in range(len(self.shards)) if k not in self.done]
        self.this_run = 0
        self.failed: set[int] = set()
        self.finished_samples = 0  # samples of the shards finished in this run

    def batch(self, k: int, samples: int, pairs: int) -> None:
        self.run.samples += samples
        self.run.pairs += pairs
        if self.progress is None:
            return
        elapsed = time.monotonic() - self.start
        self.progress(
            FilterProgress(
                k,
                len(self.shards),
                self.shards[k].name,
                self.run.samples,
                len(self.done),
                self.this_run,
                elapsed,
                self.run.pairs,
                self._expected(),
            )
        )

    def shard_done(self, k: int, samples: int) -> None:
        self.done[k] = samples
        self.this_run += 1
        self.finished_samples += samples

    def shard_failed(self, k: int, error: str) -> None:
        shard = self.shards[k]
        log.error("shard %s cannot be read, skipped: %s", shard.path, error)
        self.run.errors.append({"shard": shard.path, "error": error})
        self.failed.add(k)

    def _expected(self) -> int | None:
        if not self.done:
            return None
        mean = sum(self.done.values()) / len(self.done)
        left = sum(1 for k in self.pending if k not in self.done and k not in self.failed)
        return max(self.run.samples, self.finished_samples + round(left * mean))

    def finish(self) -> RunTotals:
        self.run.scored = [s for k, s in enumerate(self.shards) if k in self.done]
        self.run.seconds = time.monotonic() - self.start
        return self.run


def committed_samples(folder: Path, shard: Shard) -> int | None:
    """The samples of ``shard``'s committed score file, or None when it must be scored (again).

    A done marker counts only when it is readable and its score file is there with the rows the
    marker promises; otherwise (a deleted or truncated score file, a damaged marker: an earlier
    run's outputs damaged since) both are removed, so that the shard is redone."""
    import pyarrow.parquet as pq

    marker = folder / f"{shard.name}.done.json"
    target = folder / f"{shard.name}.parquet"
    if not marker.exists():
        return None
    try:
        done = loads_json(read_regular_file(marker, max_bytes=1 << 20, what="done marker"))
        samples, rows = int(done["samples"]), int(done["rows"])
        if pq.read_metadata(target).num_rows != rows:
            raise ValueError(f"{target} has not the {rows} rows its done marker says")
        return samples
    except (OSError, ValueError, TypeError, KeyError, pa_errors()) as e:
        log.warning(
            "shard %s: its committed scores are damaged (%s); scoring it again", shard.path, e
        )
        marker.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        return None


def pa_errors() -> type[Exception]:
    import pyarrow as pa

    return pa.ArrowException


class ShardUnreadable(Exception):
    """An input shard that cannot be read at all; the run goes on without it."""


# What reading a broken input raises (besides InvalidInputError about the inputs).
# RecursionError: a last guard, so that one input nested past the stack is one shard's error.
_UNREADABLE = (
    OSError,
    ValueError,
    EOFError,
    tarfile.TarError,
    csv.Error,
    zlib.error,
    RecursionError,
)


def score_pending_shard(
    engine: Engine,
    shard: Shard,
    folder: Path,
    columns: Columns,
    batch_size: int,
    before_commit: Callable[[], None] | None = None,
    *,
    captioning: Captioning | None = None,
) -> Iterator[tuple[int, int]]:
    """:func:`score_shard`, with an unreadable input turned into :class:`ShardUnreadable`
    (its partial file is removed by ``score_shard``); errors about anything else propagate."""
    try:
        yield from score_shard(
            engine, shard, folder, columns, batch_size, before_commit, captioning=captioning
        )
    except _UNREADABLE as e:
        if isinstance(e, InvalidInputError) and e.loc[:1] not in ((), ("inputs",)):
            raise
        raise ShardUnreadable(f"{type(e).__name__}: {e}") from e


def score_shard(
    engine: Engine,
    shard: Shard,
    folder: Path,
    columns: Columns | None = None,
    batch_size: int = 256,
    before_commit: Callable[[], None] | None = None,
    *,
    captioning: Captioning | None = None,
) -> Iterator[tuple[int, int]]:
    """Score one shard into ``folder/NAME.parquet`` and commit it with ``NAME.done.json``.

    Streams: one batch of samples is held at a time, the rows go to a Parquet writer as they
    come. Yields (samples, pairs) after each batch. Nothing is visible until the shard is done.
    The rows go to a temporary file of this call's own (``.NAME.parquet.partial-XXXX``), which
    is renamed into place: two writers of one shard never write one file, and each commits only
    what it wrote. ``before_commit`` may raise to stop the commit (the output lock's check).
    Unscored rows hold NULL scores. With ``captioning`` (CapFilt), each batch gets its
    synthetic captions first and every row a ``source`` column.
    """
    import pyarrow.parquet as pq

    target = folder / f"{shard.name}.parquet"
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{shard.name}.parquet.partial-")
    os.close(fd)
    tmp = Path(name)
    samples = pairs = 0
    schema = scores_schema(capfilt=captioning is not None)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in _batches(read_shard(shard, columns or Columns()), batch_size):
                if captioning is None:
                    rows = score_batch(engine, batch)
                else:
                    captioned, originals = captioning.add(batch, shard.name)
                    rows = score_batch(engine, captioned)
                    rows["source"] = row_sources(rows, originals)
                rows["sample"] = [samples + i for i in rows["sample"]]
                writer.write_table(_table(rows, schema))
                samples += len(batch)
                pairs += len(rows["sample"])
                yield len(batch), len(rows["sample"])
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    atomic_write_json(
        folder / f"{shard.name}.done.json",
        {"input": shard.fingerprint(), "samples": samples, "rows": pairs},
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what mkstemp's 0600 becomes: an ordinary file


def _table(rows: dict[str, list[Any]], schema: Any) -> Any:
    """Score rows as Arrow: a NaN score (no score) is NULL, so that SQL engines neither count
    it in ``>= x`` nor sort it first."""
    import pyarrow as pa

    return pa.Table.from_arrays(
        [pa.array(rows[f.name], f.type, from_pandas=f.name in SCORE_COLUMNS) for f in schema],
        schema=schema,
    )


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@functools.cache
def scores_schema(capfilt: bool = False) -> Any:
    """The Arrow schema of a shard's scores file (built on first use: pyarrow is the filter
    extra's, and importing blipitm.filtering needs no extra); ``capfilt`` adds ``source``
    (``original`` / ``synthetic``) after the caption."""
    import pyarrow as pa

    return pa.schema(
        [
            ("sample", pa.int64()),
            ("id", pa.string()),
            ("candidate", pa.int32()),
            ("caption", pa.string()),
            *([("source", pa.string())] if capfilt else []),
            *[(name, pa.float32()) for name in SCORE_COLUMNS],
            ("status", pa.string()),
            ("error", pa.string()),
        ]
    )
