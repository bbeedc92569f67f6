"""The build / add entry points used by the CLI: sources in, committed index out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from blipitm.common.progress import Progress, no_progress
from blipitm.engine import Engine
from blipitm.retrieval.ingest import DEFAULT_BATCH, AddReport, add_items
from blipitm.retrieval.sources import list_source
from blipitm.retrieval.store import MANIFEST, Index, NewItem


def build_index(
    engine: Engine,
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    store_features: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress = no_progress,
) -> tuple[Index, AddReport]:
    """Create the index at ``out`` (or resume an interrupted build there) and add ``sources``.

    Rerunning after an interruption, SIGKILL included, continues where the last committed batch
    ended. An existing index built with another model is refused (IndexMismatchError). Returns
    the index (open for writing; close it when done) and what was added or skipped.
    """
    items, skipped = _list_all(sources)  # a bad SRC fails before anything is created
    root = Path(out)
    if (root / MANIFEST).is_file():
        index = Index.open(root, engine, writable=True)
    else:
        index = Index.create(root, engine, store_features=store_features)
    try:
        report = add_items(
            index, engine, items, skipped=skipped, batch_size=batch_size, progress=progress
        )
    except BaseException:
        index.close()
        raise
    return index, report


def add_sources(
    index: Index,
    engine: Engine,
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = DEFAULT_BATCH,
    include_removed: bool = False,
    progress: Progress = no_progress,
) -> AddReport:
    """Add every item of ``sources`` that is not yet in ``index`` (opened writable); items
    removed earlier only with ``include_removed``."""
    items, skipped = _list_all(sources)
    return add_items(
        index,
        engine,
        items,
        skipped=skipped,
        batch_size=batch_size,
        include_removed=include_removed,
        progress=progress,
    )


def _list_all(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[list[NewItem], list[tuple[str, str]]]:
    srcs = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    items: list[NewItem] = []
    skipped: list[tuple[str, str]] = []
    for src in srcs:
        listing = list_source(src)
        items += listing.items
        skipped += listing.skipped
    return items, skipped
