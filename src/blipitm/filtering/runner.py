"""The local runner: score every shard once (committed per shard with a done marker), choose the
threshold, then write the scores with their ``kept`` column, the kept samples and the statistics.

Layout of ``out``::

    manifest.json             inputs (path, size, mtime) + model identity + reading options
    scores/NAME.parquet       one row per (sample, candidate caption); see docs/filtering.md
    scores/NAME.done.json     the shard's done marker (its fingerprint and counts)
    kept/NAME.tar|.parquet    the kept samples, original bytes untouched, plus their scores
    stats.json, histogram.png

Resume: a shard with a done marker is never scored again; one without (interrupted by Ctrl-C or
SIGKILL) is scored again whole. Another model, other inputs or other reading options than the
manifest records are refused with a message (``restart=True`` starts over instead).
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from blipitm.common.files import atomic_write, atomic_write_json, read_json
from blipitm.errors import BlipitmError, InvalidInputError
from blipitm.filtering.readers import Columns, Sample, Shard, expand_inputs, read_shard
from blipitm.filtering.scoring import BY_COLUMN, SCORE_COLUMNS, score_batch
from blipitm.filtering.stats import write_stats
from blipitm.filtering.writers import write_kept_parquet, write_kept_tar, write_parquet

if TYPE_CHECKING:
    from blipitm.engine import Engine

log = logging.getLogger("blipitm.filter")

By = Literal["itm", "itc", "blip"]
Write = Literal["scores", "kept", "both"]
MANIFEST_VERSION = 1


class FilterError(BlipitmError):
    """The output folder belongs to another run (inputs, model or options differ)."""


@dataclass(frozen=True)
class FilterProgress:
    shard: int  # index of the shard being scored
    shards: int
    name: str
    samples: int  # samples scored in this run so far
    shards_done: int  # shards finished (this run and earlier ones)
    shards_this_run: int  # shards finished in this run
    elapsed_s: float


OnProgress = Callable[[FilterProgress], None]


def filter_dataset(
    inputs: Sequence[str],
    out: str | Path,
    *,
    engine: Engine | None = None,
    model: str | None = None,
    by: By = "itm",
    threshold: float | None = None,
    keep_fraction: float | None = None,
    write: Write = "both",
    image_col: str | None = None,
    caption_col: str | None = None,
    id_col: str | None = None,
    batch_size: int = 256,
    restart: bool = False,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Score, filter and write; returns what ``stats.json`` holds. See docs/filtering.md."""
    if (threshold is None) == (keep_fraction is None):
        raise InvalidInputError(
            "give exactly one of threshold and keep_fraction", loc=("threshold",)
        )
    if keep_fraction is not None and not 0.0 <= keep_fraction <= 1.0:
        raise InvalidInputError(
            f"keep_fraction must be in [0, 1], got {keep_fraction}", loc=("keep_fraction",)
        )
    if by not in BY_COLUMN:
        raise InvalidInputError(f"by must be one of {sorted(BY_COLUMN)}, got {by!r}", loc=("by",))
    if batch_size < 1:
        raise InvalidInputError("batch_size must be positive", loc=("batch_size",))
    shards = expand_inputs(inputs)
    columns = Columns(image_col, caption_col, id_col)
    out = Path(out)
    if engine is None:
        from blipitm.engine import DEFAULT_MODEL, load

        engine = load(model or DEFAULT_MODEL)
    _open_out(out, shards, columns, engine, restart)
    run = _score_all(engine, shards, out, columns, batch_size, progress)
    cut = choose_cut(out, shards, run.scored, BY_COLUMN[by], threshold, keep_fraction)
    kept = _write_outputs(out, shards, run.scored, columns, BY_COLUMN[by], cut, write)
    return write_stats(
        out,
        [out / "scores" / f"{s.name}.parquet" for s in run.scored],
        by=by,
        column=BY_COLUMN[by],
        threshold=cut.threshold,
        keep_fraction=keep_fraction,
        kept=kept,
        shard_errors=run.errors,
        throughput=run.throughput(),
    )


# -- the output folder --------------------------------------------------------------------


def _open_out(
    out: Path, shards: list[Shard], columns: Columns, engine: Engine, restart: bool
) -> None:
    from blipitm.common.identity import mismatch, model_record

    manifest_path = out / "manifest.json"
    if restart and out.exists():
        for sub in ("scores", "kept"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    if manifest_path.exists():
        old = read_json(manifest_path)
        why = _inputs_differ(old, shards, columns) or mismatch(old["model"], engine)
        if why is not None:
            raise FilterError(
                f"{out} holds another run's results: {why}. Use another --out, or --restart "
                "to discard them and start over"
            )
        return
    (out / "scores").mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        manifest_path,
        {
            "version": MANIFEST_VERSION,
            "inputs": [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards],
            "columns": asdict(columns),
            "model": model_record(engine),
        },
    )


def _inputs_differ(old: dict[str, Any], shards: list[Shard], columns: Columns) -> str | None:
    if old.get("columns") != asdict(columns):
        return f"it was read with columns {old.get('columns')}, now {asdict(columns)}"
    now = [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards]
    before = old.get("inputs", [])
    if len(now) != len(before):
        return f"it has {len(before)} input shards, now {len(now)}"
    for a, b in zip(before, now, strict=True):
        if a != b:
            return f"input {b['path']} changed since (was {a['path']}, {a['size']} bytes)"
    return None


# -- stage 1: scores ----------------------------------------------------------------------


@dataclass
class _Run:
    scored: list[Shard]
    errors: list[dict[str, str]]
    samples: int = 0
    pairs: int = 0
    seconds: float = 0.0

    def throughput(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            "samples_scored_this_run": self.samples,
            "pairs_scored_this_run": self.pairs,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples / s, 2) if self.samples else 0.0,
            "pairs_per_s": round(self.pairs / s, 2) if self.pairs else 0.0,
        }


def _score_all(
    engine: Engine,
    shards: list[Shard],
    out: Path,
    columns: Columns,
    batch_size: int,
    progress: OnProgress | None,
) -> _Run:
    run = _Run([], [])
    start = time.monotonic()
    finished = this_run = 0
    for k, shard in enumerate(shards):
        if (out / "scores" / f"{shard.name}.done.json").exists():
            run.scored.append(shard)
            finished += 1
            continue
        try:
            for n in score_shard(engine, shard, out / "scores", columns, batch_size):
                run.samples += n[0]
                run.pairs += n[1]
                if progress is not None:
                    elapsed = time.monotonic() - start
                    progress(
                        FilterProgress(
                            k, len(shards), shard.name, run.samples, finished, this_run, elapsed
                        )
                    )
        except (OSError, ValueError, EOFError, tarfile.TarError, csv.Error) as e:  # a bad shard
            if isinstance(e, InvalidInputError) and e.loc[:1] not in ((), ("inputs",)):
                raise
            msg = f"{type(e).__name__}: {e}"
            log.error("shard %s cannot be read, skipped: %s", shard.path, msg)
            run.errors.append({"shard": shard.path, "error": msg})
            (out / "scores" / f".{shard.name}.parquet.partial").unlink(missing_ok=True)
            continue
        run.scored.append(shard)
        finished += 1
        this_run += 1
    run.seconds = time.monotonic() - start
    return run


def score_shard(
    engine: Engine,
    shard: Shard,
    folder: Path,
    columns: Columns | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[int, int]]:
    """Score one shard into ``folder/NAME.parquet`` and commit it with ``NAME.done.json``.

    Streams: one batch of samples is held at a time, the rows go to a Parquet writer as they
    come. Yields (samples, pairs) after each batch. Nothing is visible until the shard is done.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = folder / f"{shard.name}.parquet"
    tmp = folder / f".{shard.name}.parquet.partial"
    samples = pairs = 0
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for batch in _batches(read_shard(shard, columns or Columns()), batch_size):
            rows = score_batch(engine, batch)
            rows["sample"] = [samples + i for i in rows["sample"]]
            writer.write_table(pa.Table.from_pydict(rows, schema=SCHEMA))
            samples += len(batch)
            pairs += len(rows["sample"])
            yield len(batch), len(rows["sample"])
    atomic_write(target, lambda f: f.write(tmp.read_bytes()))
    tmp.unlink()
    atomic_write_json(
        folder / f"{shard.name}.done.json",
        {"input": shard.fingerprint(), "samples": samples, "rows": pairs},
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


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("sample", pa.int64()),
            ("id", pa.string()),
            ("candidate", pa.int32()),
            ("caption", pa.string()),
            *[(name, pa.float32()) for name in SCORE_COLUMNS],
            ("status", pa.string()),
            ("error", pa.string()),
        ]
    )


SCHEMA = _schema()


# -- stage 2: the threshold ---------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Keep a row iff its score > threshold, or == threshold and its global row number is at
    most ``last_tied`` (ties broken by input order, as a stable sort would)."""

    threshold: float
    last_tied: float = math.inf

    def keep(self, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(scores)
        return ok & (
            (scores > self.threshold) | ((scores == self.threshold) & (rows <= self.last_tied))
        )


def choose_cut(
    out: Path,
    shards: Sequence[Shard],
    scored: Sequence[Shard],
    column: str,
    threshold: float | None,
    keep_fraction: float | None,
) -> Cut:
    if threshold is not None:
        return Cut(float(threshold))
    assert keep_fraction is not None
    import pyarrow.parquet as pq

    # Only the one score column, 4 bytes per row: DataComp's exact global quantile needs it all.
    parts = [
        pq.read_table(out / "scores" / f"{s.name}.parquet", columns=[column])[column]
        for s in scored
    ]
    scores = np.concatenate(
        [p.to_numpy(zero_copy_only=False).astype(np.float32) for p in parts]
        or [np.zeros(0, np.float32)]
    )
    rows = np.flatnonzero(~np.isnan(scores))
    k = math.ceil(Fraction(str(keep_fraction)) * len(rows))
    if k == 0:
        return Cut(math.inf)
    order = rows[np.lexsort((rows, -scores[rows]))][:k]
    t = float(scores[order[-1]])
    return Cut(t, float(order[-1]))


# -- stage 2: outputs ---------------------------------------------------------------------


def _write_outputs(
    out: Path,
    shards: Sequence[Shard],
    scored: Sequence[Shard],
    columns: Columns,
    column: str,
    cut: Cut,
    write: Write,
) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept_rows = kept_samples = offset = 0
    if write in ("kept", "both"):
        (out / "kept").mkdir(exist_ok=True)
    for shard in scored:
        path = out / "scores" / f"{shard.name}.parquet"
        table = pq.read_table(path)
        if "kept" in table.column_names:
            table = table.drop_columns(["kept"])
        scores = table[column].to_numpy(zero_copy_only=False).astype(np.float32)
        keep = cut.keep(scores, np.arange(offset, offset + len(scores), dtype=np.float64))
        offset += len(scores)
        table = table.append_column("kept", pa.array(keep, pa.bool_()))
        write_parquet(path, table)
        kept_rows += int(keep.sum())
        if write in ("kept", "both"):
            kept_samples += _write_kept(out, shard, columns, table, column)
    return {"pairs": kept_rows, "samples": kept_samples}


def _write_kept(out: Path, shard: Shard, columns: Columns, table: Any, column: str) -> int:
    """The kept samples of one shard, read again from the input (never scored again)."""
    rows = table.filter(table["kept"]).to_pylist()
    by_sample: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_sample.setdefault(r["sample"], []).append(r)

    def kept() -> Iterator[tuple[Sample, dict[str, Any]]]:
        for i, sample in enumerate(read_shard(shard, columns)):
            if i in by_sample:
                yield sample, _kept_fields(by_sample[i], column)

    if shard.kind == "tar":
        return write_kept_tar(out / "kept" / f"{shard.name}.tar", kept())
    return write_kept_parquet(out / "kept" / f"{shard.name}.parquet", kept())


def _kept_fields(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    """The best kept candidate's scores, and every kept caption (CapFilt keeps several)."""
    best = max(rows, key=lambda r: (r[column], -r["candidate"]))
    return {
        **{name: best[name] for name in SCORE_COLUMNS},
        "caption_kept": best["caption"],
        "captions_kept": [r["caption"] for r in rows],
    }
