"""Stage 1 (scoring) on Ray Data: whole shards handed to an actor pool.

Each pending shard is one row of a Ray dataset; ``map_batches`` with a callable class
(:class:`ShardScorer`, one engine per actor) scores it with the local runner's own
:func:`~blipitm.filtering.shards.score_pending_shard` and commits it with the same done marker.
The actor yields a small progress row after every batch, so the driver reports per-sample
progress while shards are in flight. Choosing the threshold, writing the kept samples and the
statistics then run on the driver exactly as in a local run, from the committed score files.

Why whole shards rather than ``read_webdataset`` / ``read_parquet``: resume is per shard, and a
shard is committed only when all its rows are scored. Ray Data's readers split and merge files
into blocks with no promise of one block per file, so no task would know when a shard's last row
is in; they also skip or fail on what the local reader reports as a status (a member without a
caption, an unreadable file) and group tar members their own way. Handing over the shard keeps
the reading, the statuses and the commit the local run's, byte for byte. See docs/filtering.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from blipitm.common.ray_cluster import ray_cluster
from blipitm.engine.options import LoadOptions
from blipitm.filtering.capfilt import CapFilt, Captioning, in_actor, open_captioner
from blipitm.filtering.inputs import Shard
from blipitm.filtering.lock import check_owner
from blipitm.filtering.readers import Columns
from blipitm.filtering.runs import RayRun
from blipitm.filtering.shards import FilterError, ShardUnreadable, Tally, score_pending_shard

log = logging.getLogger("blipitm.filter")


class ShardScorer:
    """A Ray Data actor: loads the model once (and, for CapFilt, the captioner: both models
    in one actor, docs/capfilt.md says why), then scores whole shards into ``out/scores``.

    Input batches hold shard indices (``{"shard": [k]}``); the output rows are progress events
    with columns ``shard``, ``samples``, ``pairs``, ``done`` and ``error``.
    """

    def __init__(
        self,
        options: LoadOptions,
        shards: list[Shard],
        out: str,
        columns: Columns,
        batch_size: int,
        model: dict[str, Any],
        token: str | None = None,
        capfilt: CapFilt | None = None,
        captioner: dict[str, Any] | None = None,
    ) -> None:
        from blipitm.common.identity import mismatch
        from blipitm.common.memory import apply_memory_policy
        from blipitm.engine import load_options

        apply_memory_policy()  # the actor is its own process: an entry point like the CLI's

        self.engine = load_options(options)
        why = mismatch(model, self.engine)
        if why is not None:  # e.g. a worker node with other weights under the same path
            raise FilterError(f"a Ray worker loaded another model than the driver: {why}")
        self.captioning = None if capfilt is None else _captioning(capfilt, captioner)
        self.shards, self.folder = shards, Path(out) / "scores"
        self.columns, self.batch_size = columns, batch_size
        # The driver holds out's lock; an actor commits a shard only while it still does.
        self.before_commit = None if token is None else (lambda: check_owner(out, token))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for k in batch["shard"].tolist():
            samples = 0
            try:
                for n, pairs in score_pending_shard(
                    self.engine,
                    self.shards[k],
                    self.folder,
                    self.columns,
                    self.batch_size,
                    self.before_commit,
                    captioning=self.captioning,
                ):
                    samples += n
                    yield _event(k, n, pairs)
            except ShardUnreadable as e:
                yield _event(k, 0, 0, error=str(e))
                continue
            yield _event(k, samples, 0, done=True)


def _captioning(capfilt: CapFilt, recorded: dict[str, Any] | None) -> Captioning:
    """The actor's captioner, refused when it is not the one the driver recorded (another
    checkpoint under the same path on a worker node)."""
    captioning = Captioning(open_captioner(capfilt.captioner), capfilt)
    loaded = captioning.record()["captioner"]
    if recorded is not None and loaded != recorded:
        raise FilterError(
            f"a Ray worker loaded another captioner than the driver: {loaded}, not {recorded}"
        )
    return captioning


def _event(k: int, samples: int, pairs: int, *, done: bool = False, error: str = "") -> Any:
    return {
        "shard": np.array([k]),
        "samples": np.array([samples]),
        "pairs": np.array([pairs]),
        "done": np.array([done]),
        "error": np.array([error], dtype=object),
    }


def score_all_ray(
    options: LoadOptions,
    model: dict[str, Any],
    tally: Tally,
    out: Path,
    columns: Columns,
    run: RayRun,
    *,
    token: str | None = None,
    capfilt: CapFilt | None = None,
    captioner: dict[str, Any] | None = None,
) -> None:
    """Score ``tally``'s pending shards on Ray as ``run`` says; the tally records what comes
    back. ``token``: the driver's output lock, which actors check before committing a shard.
    ``capfilt``: each actor also loads its captioner (checked against ``captioner``, the
    driver's record of it)."""
    if not tally.pending:
        return
    with ray_cluster(run) as cpus_per_worker:
        _score_on_ray(
            options,
            model,
            tally,
            out,
            columns,
            run,
            cpus_per_worker,
            token,
            capfilt=capfilt,
            captioner=captioner,
        )


def _score_on_ray(
    options: LoadOptions,
    model: dict[str, Any],
    tally: Tally,
    out: Path,
    columns: Columns,
    run: RayRun,
    cpus_per_worker: float,
    token: str | None,
    *,
    capfilt: CapFilt | None,
    captioner: dict[str, Any] | None,
) -> None:
    """The Ray Data pipeline of :func:`score_all_ray`, on a Ray already joined; progress rows
    come back as the actors score, and Ray Data's own settings are restored after."""
    import ray

    ctx = ray.data.DataContext.get_current()
    caller = (ctx.enable_progress_bars, ctx.target_max_block_size)
    try:
        # Absolute paths: a worker's working directory is not the driver's.
        shards = [replace(s, path=os.path.abspath(s.path)) for s in tally.shards]
        ctx.enable_progress_bars = False  # blipitm reports progress itself, per sample
        # An actor's progress rows are tiny; without this they are buffered into one block
        # per shard and arrive only when the shard is done.
        ctx.target_max_block_size = 1
        ds = ray.data.from_items(
            [{"shard": k} for k in tally.pending], override_num_blocks=len(tally.pending)
        ).map_batches(
            ShardScorer,
            fn_constructor_kwargs={
                "options": run.actor_options(options),
                "shards": shards,
                "out": str(out.resolve()),
                "columns": columns,
                "batch_size": run.batch_size,
                "model": model,
                "token": token,
                "capfilt": None if capfilt is None else in_actor(capfilt, run),
                "captioner": captioner,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=run.workers),
            num_cpus=cpus_per_worker,
            num_gpus=run.gpus_per_worker or None,
        )
        for event in ds.iter_rows():
            k = int(event["shard"])
            if event["error"]:
                tally.shard_failed(k, str(event["error"]))
            elif event["done"]:
                tally.shard_done(k, int(event["samples"]))
            else:
                tally.batch(k, int(event["samples"]), int(event["pairs"]))
    finally:
        ctx.enable_progress_bars, ctx.target_max_block_size = caller
