"""The build / add entry points used by the CLI: sources in, committed index out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blipitm.common.progress import Progress, no_progress
from blipitm.retrieval.errors import IndexFormatError
from blipitm.retrieval.ingest import DEFAULT_BATCH, AddReport, add_items
from blipitm.retrieval.sources import SourceListing, list_source
from blipitm.retrieval.store import MANIFEST, Index

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine

Sources = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def build_index(
    engine: Engine,
    sources: Sources,
    out: str | os.PathLike[str],
    *,
    store_features: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress = no_progress,
    listing: SourceListing | None = None,
) -> tuple[Index, AddReport]:
    """Create the index at ``out`` (or resume an interrupted build there) and add ``sources``.

    Rerunning after an interruption, SIGKILL included, continues where the last committed batch
    ended. An existing index built with another model is refused (IndexMismatchError), and so is
    one built from other sources (IndexFormatError: :func:`add_sources` adds to an index).
    ``listing`` is ``list_sources(sources)`` if the caller has it already. Returns the index
    (open for writing; close it when done) and what was added or skipped.
    """
    if listing is None:
        listing = list_sources(sources)  # a bad SRC fails before anything is created
    check_build_target(sources, out)
    root = Path(out)
    if (root / MANIFEST).is_file():
        index = Index.open(root, engine, writable=True)
    else:
        index = Index.create(
            root, engine, store_features=store_features, build_sources=_keys(sources)
        )
    try:
        report = add_items(
            index,
            engine,
            listing.items,
            skipped=listing.skipped,
            batch_size=batch_size,
            progress=progress,
        )
    except BaseException:
        index.close()
        raise
    report.ignored = listing.ignored
    return index, report


def check_build_target(sources: Sources, out: str | os.PathLike[str]) -> None:
    """Refuse (IndexFormatError) a build onto an existing index unless it resumes the build that
    created it (the same sources): adding another source is ``index add``'s job, and a build
    that quietly did it would make a typo in ``--out`` merge two collections. Cheap: no model."""
    root = Path(out)
    if not (root / MANIFEST).is_file():
        return  # new, or a create killed before its manifest (Index.create clears that)
    with Index.open(root) as existing:
        recorded = existing.build_sources()
    wanted = _keys(sources)
    if recorded is not None and sorted(recorded) == sorted(wanted):
        return
    given = " ".join(str(s) for s in _as_list(sources))
    was = "" if recorded is None else f" (built from {', '.join(recorded)})"
    raise IndexFormatError(
        f"index {root} already exists{was}; to add {given} to it, run "
        f"'blipitm index add {root} {given}', or build into a new --out folder (rerunning a "
        "build with the same sources resumes it)"
    )


def add_sources(
    index: Index,
    engine: Engine,
    sources: Sources,
    *,
    batch_size: int = DEFAULT_BATCH,
    include_removed: bool = False,
    progress: Progress = no_progress,
    listing: SourceListing | None = None,
) -> AddReport:
    """Add every item of ``sources`` that is not yet in ``index`` (opened writable); items
    removed earlier only with ``include_removed``. ``listing``: as for :func:`build_index`."""
    if listing is None:
        listing = list_sources(sources)
    report = add_items(
        index,
        engine,
        listing.items,
        skipped=listing.skipped,
        batch_size=batch_size,
        include_removed=include_removed,
        progress=progress,
    )
    report.ignored = listing.ignored
    return report


def list_sources(sources: Sources) -> SourceListing:
    """Every source's items, skipped entries and ignored files, in order; needs no model, so
    the CLI lists (and refuses a bad SRC) before loading one."""
    out = SourceListing()
    for src in _as_list(sources):
        listing = list_source(src)
        out.items += listing.items
        out.skipped += listing.skipped
        out.ignored += listing.ignored
    return out


def _as_list(sources: Sources) -> list[str | os.PathLike[str]]:
    return [sources] if isinstance(sources, str | os.PathLike) else list(sources)


def _keys(sources: Sources) -> list[str]:
    return [str(Path(s).resolve()) for s in _as_list(sources)]
