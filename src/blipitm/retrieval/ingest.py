"""Embedding items into an index in committed batches, skipping what the engine cannot read.

Resume is by ``source`` key: items already live in the index are not embedded again, so a
rerun of an interrupted build (or ``index add`` of a grown folder) does only the missing work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blipitm.common.progress import Progress, no_progress
from blipitm.common.safeio import MAX_IMAGE_FILE_BYTES, UnreadableFileError, read_regular_file
from blipitm.errors import InvalidInputError
from blipitm.retrieval.store import Index, NewItem

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine

log = logging.getLogger("blipitm")

DEFAULT_BATCH = 64


@dataclass
class AddReport:
    added: int = 0
    already: int = 0  # sources already live in the index (resume / duplicates)
    removed_before: int = 0  # sources removed earlier: not re-added unless asked to
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    ignored: int = 0  # files of the folders without an image extension, not indexed


def add_items(
    index: Index,
    engine: Engine,
    items: Sequence[NewItem],
    *,
    skipped: Sequence[tuple[str, str]] = (),
    batch_size: int = DEFAULT_BATCH,
    include_removed: bool = False,
    progress: Progress = no_progress,
) -> AddReport:
    """Embed and commit ``items`` not yet in ``index``; batches are committed as they finish.

    Items removed from the index earlier stay out (re-adding a folder must not resurrect what
    was deliberately removed) unless ``include_removed``."""
    report = AddReport(skipped=list(skipped))
    live = index.live_sources()
    removed = set() if include_removed else index.removed_sources() - live
    todo: list[NewItem] = []
    seen: set[str] = set()
    for it in items:
        if it.source in removed:
            report.removed_before += 1
        elif it.source in live or it.source in seen:
            report.already += 1
        else:
            seen.add(it.source)
            todo.append(it)
    if report.skipped:
        index.record_skipped(report.skipped)
    progress("index", 0, len(todo))
    done = 0
    for batch in _batches(todo, batch_size):
        ok, emb, feats, bad = _embed(engine, batch, keep_features=index.has_features)
        index.append(ok, emb, feats, skipped=bad)
        for source, reason in bad:
            log.warning("skipped %s: %s", source, reason)
        report.added += len(ok)
        report.skipped += bad
        done += len(batch)
        progress("index", done, len(todo))
    return report


def _batches(items: list[NewItem], size: int) -> list[list[NewItem]]:
    """Consecutive runs of one kind, at most ``size`` long (one engine call per batch)."""
    out: list[list[NewItem]] = []
    for it in items:
        if out and out[-1][0].kind == it.kind and len(out[-1]) < size:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def read_image_file(path: str | Path) -> bytes:
    """An indexed image's bytes: a regular file of at most MAX_IMAGE_FILE_BYTES, read without
    blocking (a FIFO named .jpg, a symlink to /dev/zero). UnreadableFileError or OSError
    otherwise, for the caller to list."""
    return read_regular_file(path, max_bytes=MAX_IMAGE_FILE_BYTES, what="image file")


def _read_images(
    batch: list[NewItem],
) -> tuple[list[NewItem], list[bytes], list[tuple[str, str]]]:
    ok: list[NewItem] = []
    data: list[bytes] = []
    bad: list[tuple[str, str]] = []
    for it in batch:
        try:
            data.append(read_image_file(str(it.path)))
        except UnreadableFileError as e:
            bad.append((it.source, str(e)))
            continue
        except OSError as e:
            bad.append((it.source, f"cannot read image file {it.path}: {e.strerror or e}"))
            continue
        ok.append(it)
    return ok, data, bad


def _embed(
    engine: Engine, batch: list[NewItem], *, keep_features: bool
) -> tuple[list[NewItem], np.ndarray, np.ndarray | None, list[tuple[str, str]]]:
    """Embed one single-kind batch. Image files are read here, as regular files under a cap
    (:func:`read_image_file`), and what cannot be read is skipped. The engine validates a whole
    call before computing and names the first bad input (``images[3]``); we drop that item and
    retry, so bad files cost one decode each and never abort the batch."""
    is_image = batch[0].kind == "image"
    if is_image:
        ok, data, bad = _read_images(batch)
    else:
        ok, data, bad = list(batch), [], []
    while ok:
        try:
            if is_image:
                encoded = engine.encode_images(list(data))
                feats = encoded.astype("float16").tokens if keep_features else None
                return ok, encoded.embeddings, feats, bad
            return ok, engine.embed_texts([str(it.text) for it in ok]), None, bad
        except InvalidInputError as e:
            j = _bad_position(e, len(ok))
            if j is None:
                raise
            bad.append((ok[j].source, e.reason))
            del ok[j]
            if is_image:
                del data[j]
    dim = engine.embedding_dim
    return [], np.zeros((0, dim), np.float32), _no_features(engine, keep_features), bad


def _bad_position(e: InvalidInputError, n: int) -> int | None:
    match e.loc:
        case ("images" | "texts", int(j)) if j < n:
            return j
    return None


def _no_features(engine: Engine, keep: bool) -> np.ndarray | None:
    if not keep:
        return None
    return np.zeros((0, engine.info.image_tokens, engine.config.vision.hidden_size), np.float16)
