"""A filtering run: score every shard once (committed per shard with a done marker; in this
process, or on Ray Data), choose the cut, then write the scores with their ``kept`` column,
the kept samples and the statistics.

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

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from blipitm.common.memory import apply_memory_policy
from blipitm.engine.options import LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.filtering.capfilt import CapFilt, Captioning, open_captioner
from blipitm.filtering.inputs import Shard, expand_inputs, read_shard
from blipitm.filtering.lock import OutputLock
from blipitm.filtering.manifest import open_out
from blipitm.filtering.policy import Cut, KeepFraction, KeepPolicy, Threshold
from blipitm.filtering.readers import DEFAULT_COLUMNS, Columns, Sample
from blipitm.filtering.runs import (
    DEFAULT_OPTIONS,
    DEFAULT_RUN,
    LocalRun,
    RayRun,
    Run,
    options_of,
)
from blipitm.filtering.scoring import SCORE_COLUMNS
from blipitm.filtering.shards import (
    OnProgress,
    RunTotals,
    ShardUnreadable,
    Tally,
    score_pending_shard,
)
from blipitm.filtering.stats import FilterStats, collect_stats, read_column, write_histogram
from blipitm.filtering.writers import Kept, write_parquet

if TYPE_CHECKING:
    from blipitm.engine import Engine

Write = Literal["scores", "kept", "both"]
WRITES: tuple[Write, ...] = get_args(Write)


def filter_dataset(
    inputs: Sequence[str],
    out: str | Path,
    keep_policy: KeepPolicy,
    *,
    model: Engine | LoadOptions = DEFAULT_OPTIONS,
    columns: Columns = DEFAULT_COLUMNS,
    run: Run = DEFAULT_RUN,
    write: Write = "both",
    restart: bool = False,
    progress: OnProgress | None = None,
    capfilt: CapFilt | None = None,
) -> FilterStats:
    """Score ``inputs``, keep what ``keep_policy`` keeps, write everything to ``out`` (also
    ``stats.json``: the result returned). See docs/filtering.md.

    ``model``: an engine, or the options of one to load (the default model with a 64 MiB image
    cache when not given). ``run``: in this process, or a :class:`RayRun` (its actors load
    ``model``'s options, or an engine's source, revision, protocol and dtype). ``write``:
    ``"scores"`` writes no kept samples. ``progress`` is called after every scored batch.
    ``capfilt``: bootstrap as BLIP's CapFilt, each image's captions scored with K synthetic
    ones from its captioner (docs/capfilt.md).
    """
    # The old keyword-per-knob calls fail here with a message, not deep in a run.
    if not isinstance(keep_policy, (Threshold, KeepFraction)):
        raise InvalidInputError(
            f"keep_policy must be a Threshold or a KeepFraction, got {keep_policy!r}",
            loc=("keep_policy",),
        )
    if not isinstance(run, (LocalRun, RayRun)):
        raise InvalidInputError(f"run must be a LocalRun or a RayRun, got {run!r}", loc=("run",))
    if isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(
            "model must be an Engine or a LoadOptions: LoadOptions(source) names a checkpoint",
            loc=("model",),
        )
    if capfilt is not None and not isinstance(capfilt, CapFilt):
        raise InvalidInputError(f"capfilt must be a CapFilt, got {capfilt!r}", loc=("capfilt",))
    shards = expand_inputs(inputs)
    out = Path(out)
    with OutputLock(out) as lock:  # one run per folder, from here to stats.json
        captioning = None if capfilt is None else _driver_captioning(capfilt, run)
        engine = _driver_engine(model, run)
        record = None if captioning is None else captioning.record()
        manifest = open_out(out, shards, columns, engine, restart, record)
        if isinstance(run, LocalRun):
            apply_memory_policy()  # a long run in this process: RSS follows the decode budget
            totals = _score_local(engine, shards, out, columns, run, progress, lock, captioning)
        else:
            options = model if isinstance(model, LoadOptions) else options_of(engine)
            actors_capfilt = None if captioning is None else captioning.for_actors()
            totals = _score_ray(
                options, manifest, shards, out, columns, run, progress, lock, actors_capfilt
            )
        return _finish(out, totals, columns, keep_policy, write)


def _driver_engine(model: Engine | LoadOptions, run: Run) -> Engine:
    if not isinstance(model, LoadOptions):
        return model
    from blipitm.engine import load_options

    # Under Ray the driver's engine only proves the model's identity: it needs no GPU.
    return load_options(model if isinstance(run, LocalRun) else replace(model, device="cpu"))


def _driver_captioning(capfilt: CapFilt, run: Run) -> Captioning:
    """The captioner that captions here (a local run), or that only proves its identity for
    the manifest (a Ray run: on the CPU, as the driver's engine)."""
    captioner = capfilt.captioner
    if isinstance(captioner, LoadOptions) and isinstance(run, RayRun):
        captioner = replace(captioner, device="cpu")
    return Captioning(open_captioner(captioner), capfilt)


# -- stage 1: scores ----------------------------------------------------------------------


def _score_local(
    engine: Engine,
    shards: list[Shard],
    out: Path,
    columns: Columns,
    run: LocalRun,
    progress: OnProgress | None,
    lock: OutputLock,
    captioning: Captioning | None = None,
) -> RunTotals:
    tally = Tally(shards, out, progress)
    for k in tally.pending:
        samples = 0
        try:
            for n, pairs in score_pending_shard(
                engine,
                shards[k],
                out / "scores",
                columns,
                run.batch_size,
                lock.check,
                captioning=captioning,
            ):
                samples += n
                tally.batch(k, n, pairs)
        except ShardUnreadable as e:
            tally.shard_failed(k, str(e))
            continue
        tally.shard_done(k, samples)
    return tally.finish()


def _score_ray(
    options: LoadOptions,
    manifest: dict[str, Any],
    shards: list[Shard],
    out: Path,
    columns: Columns,
    run: RayRun,
    progress: OnProgress | None,
    lock: OutputLock,
    capfilt: CapFilt | None = None,
) -> RunTotals:
    from blipitm.filtering.ray_runner import score_all_ray

    tally = Tally(shards, out, progress)
    score_all_ray(
        options,
        manifest["model"],
        tally,
        out,
        columns,
        run,
        token=lock.token,
        capfilt=capfilt,
        captioner=manifest.get("capfilt", {}).get("captioner"),
    )
    return tally.finish()


# -- stage 2: the cut, the outputs, the statistics ----------------------------------------


def _finish(
    out: Path, totals: RunTotals, columns: Columns, keep_policy: KeepPolicy, write: Write
) -> FilterStats:
    files = [out / "scores" / f"{s.name}.parquet" for s in totals.scored]
    by = keep_policy.by
    # Only the one score column, 4 bytes per row: DataComp's exact global quantile needs it all.
    cut = keep_policy.cut(lambda: read_column(files, by.column))
    kept_pairs, kept_samples = _write_outputs(out, totals.scored, columns, by.column, cut, write)
    stats = collect_stats(
        files,
        by=by,
        threshold=cut.threshold,
        keep_fraction=keep_policy.fraction if isinstance(keep_policy, KeepFraction) else None,
        kept_pairs=kept_pairs,
        kept_samples=kept_samples,
        shard_errors=totals.errors,
        throughput=totals.throughput(),
    )
    stats.write(out / "stats.json")
    write_histogram(out / "histogram.png", files, by.column, cut.threshold)
    return stats


def _write_outputs(
    out: Path,
    scored: Sequence[Shard],
    columns: Columns,
    column: str,
    cut: Cut,
    write: Write,
) -> tuple[int, int]:
    """Each score file with its ``kept`` column, and (``write`` not ``"scores"``) the kept
    samples; returns the pairs and the samples kept."""
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
    return kept_rows, kept_samples


def _write_kept(out: Path, shard: Shard, columns: Columns, table: Any, column: str) -> int:
    """The kept samples of one shard, by its format's writer (read again from the input when
    the writer asks; never scored again)."""
    rows = table.filter(table["kept"]).to_pylist()
    by_sample: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_sample.setdefault(r["sample"], []).append(r)
    fields = {i: _kept_fields(rs, column) for i, rs in by_sample.items()}

    def samples() -> Iterator[tuple[Sample, dict[str, Any]]]:
        for i, sample in enumerate(read_shard(shard, columns, load_images=False)):
            if i in fields:
                yield sample, fields[i]

    fmt = shard.format
    capfilt = "source" in table.column_names
    return fmt.write_kept(
        out / "kept" / f"{shard.name}{fmt.kept_suffix}",
        Kept(shard.path, fields, samples(), capfilt),
    )


def _kept_fields(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    """The best kept candidate's scores, and every kept caption (a caption list keeps
    several); a CapFilt run's rows also give ``captions``, each with its source and scores."""
    best = max(rows, key=lambda r: (r[column], -r["candidate"]))
    fields = {
        **{name: best[name] for name in SCORE_COLUMNS},
        "caption_kept": best["caption"],
        "captions_kept": [r["caption"] for r in rows],
    }
    if "source" in best:
        fields["captions"] = [
            {k: r[k] for k in ("caption", "source", *SCORE_COLUMNS)} for r in rows
        ]
    return fields
