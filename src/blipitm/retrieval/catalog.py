"""The index's SQLite catalogue: items, skipped sources, committed row counts, batch checksums.

``index.sqlite`` is the truth about what is committed: the ``state`` table's row counts say how
much of the array files (arrays.py) is real, and one transaction commits a batch's items, its
checksums and the new counts together. Removal marks rows as tombstones (``removed = 1``), which
every query filters out. Transactions are explicit (``BEGIN IMMEDIATE`` ... ``COMMIT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from blipitm.common.safeio import loads_json
from blipitm.retrieval.errors import IndexDamagedError
from blipitm.retrieval.integrity import Batch

DATABASE = "index.sqlite"

Kind = Literal["image", "text"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row INTEGER NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    source TEXT NOT NULL,
    path TEXT,
    relpath TEXT,
    text TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    feature_row INTEGER,
    removed INTEGER NOT NULL DEFAULT 0,
    added TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_live_source ON items(source) WHERE removed = 0;
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS skipped (
    source TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('rows', 0), ('feature_rows', 0);
CREATE TABLE IF NOT EXISTS batches (
    first_row INTEGER PRIMARY KEY,
    rows INTEGER NOT NULL,
    first_feature_row INTEGER NOT NULL,
    feature_rows INTEGER NOT NULL,
    embeddings_sha256 TEXT NOT NULL,
    features_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Selecting every column the code reads proves the schema is there (a dropped table or column
# fails here, on open, instead of inside a search).
SCHEMA_PROBES = (
    "SELECT id, row, kind, source, path, relpath, text, metadata, feature_row, removed, added"
    " FROM items LIMIT 0",
    "SELECT source, reason, at FROM skipped LIMIT 0",
    "SELECT key, value FROM state LIMIT 0",
    "SELECT first_row, rows, first_feature_row, feature_rows, embeddings_sha256,"
    " features_sha256 FROM batches LIMIT 0",
    "SELECT key, value FROM meta LIMIT 0",
)

SELECT = "SELECT id, row, kind, source, path, relpath, text, metadata, feature_row FROM items"


@dataclass(frozen=True)
class NewItem:
    """An item to add. ``source`` identifies it for resume and de-duplication: the absolute
    image path, or ``file:line`` for a caption read from a file. ``path`` is where an image is
    read from; ``relpath`` is what search results show of it, all they show: the indexed
    folder's name and the path inside it, or the path a JSONL file gave, relative to its folder
    (sources.py)."""

    kind: Kind
    source: str
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    relpath: str | None = None


@dataclass(frozen=True)
class Item:
    """An indexed item as stored."""

    id: int
    row: int
    kind: Kind
    source: str
    path: str | None
    relpath: str | None
    text: str | None
    metadata: dict[str, Any]
    feature_row: int | None


def connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit, in common.sqlite.transaction().
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")
    return db


@contextlib.contextmanager
def reading(index: Path, what: str) -> Iterator[None]:
    """Turn SQLite's errors on a damaged file into one line naming the index."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        raise IndexDamagedError(
            f"index {index}: cannot {what}: {DATABASE} is damaged ({e}); rebuild the index"
        ) from None


def committed(db: sqlite3.Connection, index: Path) -> tuple[int, int]:
    """(rows, feature_rows) as committed."""
    with reading(index, "read the committed row counts"):
        got = dict(db.execute("SELECT key, value FROM state").fetchall())
    if not {"rows", "feature_rows"} <= got.keys():
        raise IndexDamagedError(
            f"index {index}: the committed row counts are missing from {DATABASE}; "
            "rebuild the index"
        )
    return int(got["rows"]), int(got["feature_rows"])


def parse_item(index: Path, rec: Sequence[Any]) -> Item:
    """An ``items`` row read with :data:`SELECT` as an :class:`Item`."""
    try:
        metadata = loads_json(rec[7])
    except (TypeError, ValueError):
        metadata = None
    if not isinstance(metadata, dict):
        raise IndexDamagedError(
            f"index {index}: the metadata of item {rec[0]} is not a JSON object; rebuild the index"
        )
    return Item(
        id=int(rec[0]),
        row=int(rec[1]),
        kind=rec[2],
        source=rec[3],
        path=rec[4],
        relpath=rec[5],
        text=rec[6],
        metadata=metadata,
        feature_row=None if rec[8] is None else int(rec[8]),
    )


def check_database(
    db: sqlite3.Connection, index: Path, manifest_sha256: str, manifest_name: str
) -> None:
    """The schema is there, the manifest is the one written at creation, the row counts agree
    with the items, and every item's metadata is a JSON object."""
    with reading(index, "open its database"):
        for probe in SCHEMA_PROBES:
            db.execute(probe)
        recorded = db.execute("SELECT value FROM meta WHERE key = 'manifest_sha256'").fetchone()
        n_items, last_row, n_frows, last_frow = db.execute(
            "SELECT COUNT(*), MAX(row), COUNT(feature_row), MAX(feature_row) FROM items"
        ).fetchone()
        bad_meta = db.execute(
            "SELECT id FROM items WHERE CASE WHEN json_valid(metadata)"
            " THEN json_type(metadata) != 'object' ELSE 1 END LIMIT 1"
        ).fetchone()
    if recorded is None or recorded[0] != manifest_sha256:
        raise IndexDamagedError(
            f"index {index}: {manifest_name} is not the one written when the index was "
            "built (was it edited?); restore it or rebuild the index"
        )
    rows, frows = committed(db, index)
    # Rows are appended densely (0..rows-1) and never deleted; a concurrent writer may have
    # committed more since committed() read the counts, never fewer.
    if (
        n_items < rows
        or (rows and last_row != n_items - 1)
        or n_frows < frows
        or (frows and last_frow != n_frows - 1)
    ):
        raise IndexDamagedError(
            f"index {index}: {DATABASE} lists {n_items} items for {rows} committed rows; "
            "rebuild the index"
        )
    if bad_meta is not None:
        raise IndexDamagedError(
            f"index {index}: the metadata of item {bad_meta[0]} is not a JSON object; "
            "rebuild the index"
        )


def committed_batches(db: sqlite3.Connection, index: Path, rows: int) -> list[Batch]:
    """The checksum records of the batches below ``rows``, in row order."""
    with reading(index, "read the batch checksums"):
        recs = db.execute(
            "SELECT * FROM batches WHERE first_row < ? ORDER BY first_row", (rows,)
        ).fetchall()
    return [Batch(*rec) for rec in recs]


def insert_batch(
    db: sqlite3.Connection,
    items: Sequence[NewItem],
    *,
    rows: int,
    feature_rows: int,
    has_features: bool,
    checksums: tuple[str, str | None],
    skipped: Iterable[tuple[str, str]],
) -> list[int]:
    """Inside a transaction: the items at rows ``rows``... (image items at feature rows
    ``feature_rows``... where the index stores features), the skipped sources, the batch's
    checksums and the new counts. Returns the new item ids."""
    frows = feature_rows
    now = now_text()
    ids: list[int] = []
    f = frows
    for j, it in enumerate(items):
        feature_row = None
        if it.kind == "image" and has_features:
            feature_row, f = f, f + 1
        cur = db.execute(
            "INSERT INTO items (row, kind, source, path, relpath, text, metadata,"
            " feature_row, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rows + j,
                it.kind,
                it.source,
                it.path,
                it.relpath,
                it.text,
                json.dumps(it.metadata, ensure_ascii=False),
                feature_row,
                now,
            ),
        )
        ids.append(int(cur.lastrowid or 0))
    db.executemany("DELETE FROM skipped WHERE source = ?", [(it.source,) for it in items])
    db.executemany(
        "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)",
        [(s, r, now) for s, r in skipped],
    )
    if items:
        db.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
            (rows, len(items), frows, f - frows, checksums[0], checksums[1]),
        )
    db.execute("UPDATE state SET value = ? WHERE key = 'rows'", (rows + len(items),))
    db.execute("UPDATE state SET value = ? WHERE key = 'feature_rows'", (f,))
    return ids


def record_skipped(db: sqlite3.Connection, skipped: Iterable[tuple[str, str]]) -> None:
    now = now_text()
    db.executemany(
        "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)", [(s, r, now) for s, r in skipped]
    )


def tombstone(
    db: sqlite3.Connection, index: Path, refs: Sequence[str | int]
) -> tuple[list[Item], list[str | int]]:
    """Inside a transaction: mark the live items ``refs`` name (id, path or source) removed."""
    removed: list[Item] = []
    missing: list[str | int] = []
    for ref in refs:
        recs: list[Any] = []
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            cur = db.execute(f"{SELECT} WHERE removed = 0 AND id = ?", (int(ref),))
            recs = cur.fetchall()
        if not recs and isinstance(ref, str):
            keys = {ref, os.path.abspath(ref)}
            marks = ",".join("?" * len(keys))
            recs = db.execute(
                f"{SELECT} WHERE removed = 0 AND (path IN ({marks}) OR source IN ({marks}))",
                [*keys, *keys],
            ).fetchall()
        if not recs:
            missing.append(ref)
        for rec in recs:
            item = parse_item(index, rec)
            db.execute("UPDATE items SET removed = 1 WHERE id = ?", (item.id,))
            removed.append(item)
    return removed, missing


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
