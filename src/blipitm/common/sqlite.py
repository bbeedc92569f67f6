"""The one SQLite transaction shape the key store and the index catalogue share."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception, for a connection in
    autocommit mode (``isolation_level=None``). IMMEDIATE takes the write lock up front, so two
    writers queue on the busy timeout instead of failing to upgrade a read lock mid-transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
