"""Retrieval over collections: an on-disk index and two-stage (ITC, then ITM) search.

>>> from blipitm.retrieval import Index, search, build_index
>>> index, report = build_index(engine, "photos/", "photos.index")  # or Index.open(path, engine)
>>> hits = search(engine, index, "a dog on the grass", top_k=5, rerank_k=128)
>>> hits[0].path, hits[0].score, hits[0].itm_probability, hits[0].itc_cosine
>>> index.verify()  # every checksum; Index.open checks what is cheap
"""

from blipitm.retrieval.errors import (
    IndexBusyError,
    IndexDamagedError,
    IndexFormatError,
    IndexMismatchError,
)
from blipitm.retrieval.ingest import AddReport, add_items
from blipitm.retrieval.search import (
    SearchHit,
    SearchHits,
    modality_problem,
    scan_top_k,
    search,
)
from blipitm.retrieval.sources import SourceListing, list_source
from blipitm.retrieval.store import Index, Item, NewItem
from blipitm.retrieval.workflow import add_sources, build_index, check_build_target, list_sources

__all__ = [
    "AddReport",
    "Index",
    "IndexBusyError",
    "IndexDamagedError",
    "IndexFormatError",
    "IndexMismatchError",
    "Item",
    "NewItem",
    "SearchHit",
    "SearchHits",
    "SourceListing",
    "add_items",
    "add_sources",
    "build_index",
    "check_build_target",
    "list_source",
    "list_sources",
    "modality_problem",
    "scan_top_k",
    "search",
]
