"""Where the Batch API keeps its files and batches: one folder (``--batch-dir``).

::

    BATCH_DIR/
      batch.db                  SQLite: the files' and batches' records (WAL, one writer)
      files/file-<id>.jsonl     uploaded input files, and the output and error files
      work/batch-<id>.out.jsonl a running batch's output, appended a line at a time
      work/batch-<id>.err.jsonl a running batch's error file, likewise

A batch's progress is its output and error files: a line is done once its answer line is in one
of them (written whole and flushed before the next). After a crash the runner reads both back,
cuts a torn last line, and goes on with the lines they do not answer, so no ``custom_id`` is
answered twice or lost. The database holds each batch's status, timestamps and counts (the counts
are recomputed from the files on resume).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blipitm.common.sqlite import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT,                 -- the key's name; NULL: an operator key or an open server
    purpose TEXT NOT NULL,      -- batch, batch_output
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT,
    record TEXT NOT NULL,       -- the batch object as the API shows it (JSON)
    created_at INTEGER NOT NULL
);
"""

TERMINAL = {"completed", "failed", "expired", "cancelled"}
ACTIVE = {"validating", "in_progress", "finalizing", "cancelling"}


@dataclass
class FileRecord:
    id: str
    owner: str | None
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: int
    path: str

    def as_api(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class Batch:
    """OpenAI's batch object, and its owner."""

    id: str
    owner: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    expires_at: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    request_counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0}
    )
    usage: dict[str, Any] = field(
        default_factory=lambda: {
            "input_tokens": 0,
            "output_tokens": 0,
            "total_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    )
    model: str | None = None

    def as_api(self) -> dict[str, Any]:
        record = asdict(self)
        del record["owner"]
        return {"object": "batch", **record}

    def mark(self, status: str) -> None:
        """``status`` now, with its timestamp."""
        self.status = status
        stamp = {
            "in_progress": "in_progress_at",
            "finalizing": "finalizing_at",
            "completed": "completed_at",
            "failed": "failed_at",
            "expired": "expired_at",
            "cancelling": "cancelling_at",
            "cancelled": "cancelled_at",
        }.get(status)
        if stamp is not None:
            setattr(self, stamp, int(time.time()))


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class BatchStore:
    """The records, thread-safe (one connection behind a lock; the routes call it from the event
    loop, where each call is a few milliseconds)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.work_dir = self.root / "work"
        for folder in (self.root, self.files_dir, self.work_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(
            self.root / "batch.db", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db) as db:
            yield db

    # -- files ------------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.owner,
                    record.purpose,
                    record.filename,
                    record.bytes,
                    record.lines,
                    record.created_at,
                    record.path,
                ),
            )

    def file(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else FileRecord(*row)

    def files(self, owner: str | None, *, everyone: bool) -> list[FileRecord]:
        with self._lock:
            if everyone:
                rows = self._db.execute("SELECT * FROM files ORDER BY rowid DESC").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM files WHERE owner IS ? ORDER BY rowid DESC", (owner,)
                ).fetchall()
        return [FileRecord(*row) for row in rows]

    def delete_file(self, file_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # -- batches ----------------------------------------------------------------------------------

    def save(self, batch: Batch) -> None:
        record = json.dumps(batch.as_api() | {"owner": batch.owner})
        with self._tx() as db:
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "record = excluded.record",
                (batch.id, batch.owner, record, batch.created_at),
            )

    def batch(self, batch_id: str) -> Batch | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        return None if row is None else _batch(json.loads(row[0]))

    def batches(self, owner: str | None, *, everyone: bool) -> list[Batch]:
        """Newest first."""
        sql = "SELECT record FROM batches"
        args: tuple[Any, ...] = ()
        if not everyone:
            sql, args = sql + " WHERE owner IS ?", (owner,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY rowid DESC", args).fetchall()
        return [_batch(json.loads(row[0])) for row in rows]

    def active(self) -> list[Batch]:
        """Batches not yet in a final state, oldest first (what the runner resumes)."""
        return [b for b in reversed(self.batches(None, everyone=True)) if b.status in ACTIVE]


def _batch(record: Mapping[str, Any]) -> Batch:
    fields = {k: v for k, v in record.items() if k != "object"}
    return Batch(**fields)
