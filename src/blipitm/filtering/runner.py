"""A filtering run: score every shard once (committed per shard with a done marker; in this
process, or on Ray Data), choose the threshold, then write the scores with their ``kept`` column,
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

import hashlib
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from blipitm.common.files import atomic_write_json
from blipitm.common.memory import apply_memory_policy
from blipitm.common.safeio import loads_json, read_regular_file
from blipitm.engine.options import DEFAULT_MODEL, LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.filtering.lock import OutputLock
from blipitm.filtering.ray_runner import LOCAL
from blipitm.filtering.readers import Columns, Sample, Shard, expand_inputs, read_shard
from blipitm.filtering.scoring import BY_COLUMN, SCORE_COLUMNS
from blipitm.filtering.shards import (
    FilterError,
    OnProgress,
    RunTotals,
    ShardUnreadable,
    Tally,
    score_pending_shard,
)
from blipitm.filtering.stats import write_stats
from blipitm.filtering.writers import (
    write_kept_csv,
    write_kept_jsonl,
    write_kept_parquet,
    write_kept_tar,
    write_parquet,
)

if TYPE_CHECKING:
    from blipitm.engine import Engine


By = Literal["itm", "itc", "blip"]
Write = Literal["scores", "kept", "both"]
MANIFEST_VERSION = 1
log = logging.getLogger("blipitm.filter")
# The engine's image cache while filtering (its own default is 512 MiB). Distinct images never
# hit it, and a full cache is memory a filter run holds for nothing (docs/filtering.md); 64 MiB
# still re-uses images that repeat nearby and makes most retries after a bad image cheap.
DEFAULT_CACHE_MB = 64


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
    options: LoadOptions | None = None,
    ray: str | bool | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
) -> dict[str, Any]:
    """Score, filter and write; returns what ``stats.json`` holds. See docs/filtering.md.

    The model: ``engine``, else ``options`` (a :class:`LoadOptions`), else ``model`` (a source
    with default options but a ``DEFAULT_CACHE_MB`` image cache). ``ray``: score on Ray Data
    instead of in this process; ``True`` or ``"local"`` starts a local Ray (unless one is
    running), any other string is the address of a cluster. Its actors load ``options``
    (default: the engine's source, revision, protocol and dtype): ``workers`` actors with
    ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs each.
    """
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
    if model is not None and options is not None:
        raise InvalidInputError("give model or options, not both", loc=("model",))
    shards = expand_inputs(inputs)
    columns = Columns(image_col, caption_col, id_col)
    out = Path(out)
    with OutputLock(out) as lock:  # one run per folder, from here to stats.json
        return _filter_locked(
            shards,
            columns,
            out,
            lock,
            engine=engine,
            model=model,
            options=options,
            by=by,
            threshold=threshold,
            keep_fraction=keep_fraction,
            write=write,
            batch_size=batch_size,
            restart=restart,
            progress=progress,
            ray=ray,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )


def _filter_locked(
    shards: list[Shard],
    columns: Columns,
    out: Path,
    lock: OutputLock,
    *,
    engine: Engine | None,
    model: str | None,
    options: LoadOptions | None,
    by: By,
    threshold: float | None,
    keep_fraction: float | None,
    write: Write,
    batch_size: int,
    restart: bool,
    progress: OnProgress | None,
    ray: str | bool | None,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float | None,
) -> dict[str, Any]:
    if engine is None:
        from blipitm.engine import load_options

        if options is None:
            options = LoadOptions(model or DEFAULT_MODEL, cache_bytes=DEFAULT_CACHE_MB << 20)
        # Under Ray the driver's engine only proves the model's identity: it needs no GPU.
        engine = load_options(options if ray in (None, False) else replace(options, device="cpu"))
    manifest = _open_out(out, shards, columns, engine, restart)
    if ray in (None, False):
        apply_memory_policy()  # a long run in this process: its RSS follows the decode budget
        run = _score_all(engine, shards, out, columns, batch_size, progress, lock)
    else:
        run = _score_all_ray(
            options or _options_of(engine),
            manifest["model"],
            shards,
            out,
            columns,
            batch_size,
            progress,
            address=LOCAL if ray is True else ray,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            token=lock.token,
        )
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
) -> dict[str, Any]:
    """The run's manifest: the one ``out`` holds (checked against this run), else a new one.
    Called under the output lock, so the temporary files found here are litter of killed runs."""
    from blipitm.common.identity import mismatch, model_record

    manifest_path = out / "manifest.json"
    if restart and out.exists():
        for sub in ("scores", "kept"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    _remove_temporaries(out)
    pin = _scoring_pin(engine)
    if manifest_path.exists():
        old = _read_manifest(manifest_path)
        why = (
            _inputs_differ(old, shards, columns)
            or mismatch(old["model"], engine)
            or _pin_differs(old.get("scoring"), pin)
        )
        if why is not None:
            raise FilterError(
                f"{out} holds another run's results: {why}. Use another --out, or --restart "
                "to discard them and start over"
            )
        return old
    (out / "scores").mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "inputs": [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards],
        "columns": asdict(columns),
        "model": model_record(engine),
        "scoring": pin,
    }
    atomic_write_json(manifest_path, manifest)
    return manifest


def _remove_temporaries(out: Path) -> None:
    """Partial score files and atomic writes' temporaries that a killed run left behind."""
    for folder in (out, out / "scores", out / "kept"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".partial" in p.name):
                log.info("removing %s, left by an interrupted run", p)
                p.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, or a :class:`FilterError` saying it is damaged and what to do."""
    try:
        old = loads_json(read_regular_file(path, max_bytes=64 << 20, what="manifest"))
        if not (
            isinstance(old, dict)
            and isinstance(old.get("inputs"), list)
            and all(isinstance(i, dict) for i in old["inputs"])
            and isinstance(old.get("columns"), dict)
            and isinstance(old.get("model"), dict)
        ):
            raise ValueError("not a filter manifest")
        return old
    except (OSError, ValueError) as e:
        raise FilterError(
            f"{path} is damaged ({e}): remove {path.parent}, or run again with --restart to "
            "discard its results and start over"
        ) from None


def _scoring_pin(engine: Engine) -> dict[str, Any]:
    """What changes the scores beyond the probe's tolerance (same weights in bf16 pass it):
    the weight and compute dtypes, the protocol, the hub commit and the weight files' digest."""
    info = engine.info
    return {
        "dtype": info.dtype,
        "compute_dtype": info.compute_dtype,
        "protocol": info.protocol,
        "commit": info.commit,
        "weights_sha256": weights_digest(info.source),
    }


def _pin_differs(old: Any, now: dict[str, Any]) -> str | None:
    if not isinstance(old, dict):
        return None  # a manifest written before the pin: the probe check alone
    if (old.get("dtype"), old.get("compute_dtype")) != (now["dtype"], now["compute_dtype"]):
        return (
            f"it was scored with dtype {old.get('dtype')} (compute {old.get('compute_dtype')}), "
            f"now {now['dtype']} (compute {now['compute_dtype']})"
        )
    for key in ("protocol", "commit"):
        if old.get(key) != now[key]:
            return f"it was scored with {key} {old.get(key)}, now {now[key]}"
    if old.get("weights_sha256") != now["weights_sha256"]:
        return (
            f"its model weights' files changed since (sha256 {str(old.get('weights_sha256'))[:12]}"
            f", now {str(now['weights_sha256'])[:12]})"
        )
    return None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def weights_digest(source: str) -> str | None:
    """SHA-256 over a local model's weight files (names and bytes); None for a hub id (its
    commit pins it)."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fp:
            while chunk := fp.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _inputs_differ(old: dict[str, Any], shards: list[Shard], columns: Columns) -> str | None:
    if old.get("columns") != asdict(columns):
        return f"it was read with columns {old.get('columns')}, now {asdict(columns)}"
    now = [{"name": s.name, "kind": s.kind, **s.fingerprint()} for s in shards]
    before = old.get("inputs", [])
    if len(now) != len(before):
        return f"it has {len(before)} input shards, now {len(now)}"
    for a, b in zip(before, now, strict=True):
        if a != b:
            return f"input {b['path']} changed since (was {a.get('path')}, {a.get('size')} bytes)"
    return None


# -- stage 1: scores ----------------------------------------------------------------------


def _score_all(
    engine: Engine,
    shards: list[Shard],
    out: Path,
    columns: Columns,
    batch_size: int,
    progress: OnProgress | None,
    lock: OutputLock,
) -> RunTotals:
    tally = Tally(shards, out, progress)
    for k in tally.pending:
        samples = 0
        try:
            for n, pairs in score_pending_shard(
                engine, shards[k], out / "scores", columns, batch_size, lock.check
            ):
                samples += n
                tally.batch(k, n, pairs)
        except ShardUnreadable as e:
            tally.shard_failed(k, str(e))
            continue
        tally.shard_done(k, samples)
    return tally.finish()


def _score_all_ray(
    options: LoadOptions,
    model: dict[str, Any],
    shards: list[Shard],
    out: Path,
    columns: Columns,
    batch_size: int,
    progress: OnProgress | None,
    **ray: Any,
) -> RunTotals:
    from blipitm.filtering.ray_runner import score_all_ray

    if ray["workers"] < 1:
        raise InvalidInputError("workers must be positive", loc=("workers",))
    tally = Tally(shards, out, progress)
    score_all_ray(options, model, tally, out, columns, batch_size, **ray)
    return tally.finish()


def _options_of(engine: Engine) -> LoadOptions:
    """What a Ray actor loads to get ``engine``'s model (checked against it by the probe)."""
    info = engine.info
    return LoadOptions(
        info.source,
        revision=info.revision,
        protocol=info.protocol,
        dtype=info.dtype,
        compute_dtype=info.compute_dtype,
        cache_bytes=DEFAULT_CACHE_MB << 20,
    )


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
    fields = {i: _kept_fields(rs, column) for i, rs in by_sample.items()}
    if shard.kind == "parquet":  # the input's own schema, row for row
        return write_kept_parquet(out / "kept" / f"{shard.name}.parquet", shard.path, fields)

    def kept() -> Iterator[tuple[Sample, dict[str, Any]]]:
        for i, sample in enumerate(read_shard(shard, columns, load_images=False)):
            if i in fields:
                yield sample, fields[i]

    if shard.kind == "tar":
        return write_kept_tar(out / "kept" / f"{shard.name}.tar", kept())
    if shard.kind == "jsonl":
        return write_kept_jsonl(out / "kept" / f"{shard.name}.jsonl", kept())
    return write_kept_csv(out / "kept" / f"{shard.name}.parquet", shard.path, kept())


def _kept_fields(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    """The best kept candidate's scores, and every kept caption (CapFilt keeps several)."""
    best = max(rows, key=lambda r: (r[column], -r["candidate"]))
    return {
        **{name: best[name] for name in SCORE_COLUMNS},
        "caption_kept": best["caption"],
        "captions_kept": [r["caption"] for r in rows],
    }
