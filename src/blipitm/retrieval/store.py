"""The on-disk index: one folder, append-only arrays plus SQLite metadata.

Layout::

    INDEX/manifest.json    model record (identity.py), dims, feature layout, blipitm version
    INDEX/embeddings.f32   [rows, E] float32, raw and memory-mappable; row r <-> items.row = r
    INDEX/features.f16     [feature_rows, T, Dv] float16 vision tokens (only with store_features)
    INDEX/index.sqlite     items, skipped sources, and the committed row counts (table state)
    INDEX/lock             flock()ed by the one process allowed to write

Crash safety (SIGKILL at any instant leaves a consistent index): a batch is appended to the
array files and fsynced *first*, then its rows and the new row counts are committed in one SQLite
transaction. The counts in SQLite are the truth: bytes beyond them are an unfinished batch and a
writer truncates them on open; readers never look past them. Removal marks rows as tombstones
(``removed = 1``), which every query filters out.
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

import numpy as np

from blipitm.engine import Engine
from blipitm.retrieval.errors import IndexBusyError, IndexFormatError, IndexMismatchError
from blipitm.retrieval.fsutil import atomic_write_json, read_json
from blipitm.retrieval.identity import mismatch, model_record, package_version

try:  # POSIX advisory locks; elsewhere single-writer discipline is the user's job.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "blipitm-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.f32"
FEATURES = "features.f16"
DATABASE = "index.sqlite"
LOCK = "lock"

Kind = Literal["image", "text"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row INTEGER NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    source TEXT NOT NULL,
    path TEXT,
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
"""


@dataclass(frozen=True)
class NewItem:
    """An item to add. ``source`` identifies it for resume and de-duplication: the absolute
    image path, or ``file:line`` for a caption read from a file."""

    kind: Kind
    source: str
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """An indexed item as stored."""

    id: int
    row: int
    kind: Kind
    source: str
    path: str | None
    text: str | None
    metadata: dict[str, Any]
    feature_row: int | None


class Index:
    """An opened index. Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(self, path: Path, manifest: dict[str, Any], db: sqlite3.Connection, lock: Any):
        self.path = path
        self.manifest = manifest
        self._db = db
        self._lock = lock
        self._cache: tuple[int, int, np.ndarray, np.ndarray] | None = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], engine: Engine, *, store_features: bool = False
    ) -> Index:
        """Create an empty index for ``engine``'s model at ``path`` (absent or empty folder)."""
        root = Path(path)
        if root.exists() and not (root / MANIFEST).exists():
            _clear_unfinished_create(root)
        if root.exists() and any(root.iterdir()):
            raise IndexFormatError(
                f"{root} exists and is not empty; choose a new folder, or open the existing "
                "index to add to it"
            )
        root.mkdir(parents=True, exist_ok=True)
        vision = engine.config.vision
        n_tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + CLS
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "blipitm_version": package_version(),
            "model": model_record(engine),
            "embedding_dim": engine.embedding_dim,
            "embedding_dtype": "float32",
            "store_features": store_features,
            "feature_shape": [n_tokens, vision.hidden_size] if store_features else None,
            "feature_dtype": "float16" if store_features else None,
        }
        (root / EMBEDDINGS).touch()
        if store_features:
            (root / FEATURES).touch()
        db = _connect(root / DATABASE)
        db.executescript(_SCHEMA)
        # The manifest goes last: a folder without one is a build that never started.
        atomic_write_json(root / MANIFEST, manifest)
        db.close()
        return cls.open(root, engine, writable=True)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], engine: Engine | None = None, *, writable: bool = False
    ) -> Index:
        """Open an index; with ``engine``, refuse (IndexMismatchError) if it is another model.

        ``writable`` takes the writer lock and drops any batch a killed writer left
        half-written. Readers take no lock and see only committed rows.
        """
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise IndexFormatError(
                f"{root} is not a blipitm index (no {MANIFEST}); create one with "
                "'blipitm index build SRC --out INDEX'"
            )
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{root}: unsupported index format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}; rebuild it with this blipitm"
            )
        if engine is not None:
            why = mismatch(manifest["model"], engine)
            if why is not None:
                raise IndexMismatchError(f"cannot use index {root} with this model: {why}")
        lock = _take_lock(root) if writable else None
        try:
            db = _connect(root / DATABASE)
            index = cls(root, manifest, db, lock)
            if writable:
                index._truncate_uncommitted()
            else:
                index._check_sizes()
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        return index

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def has_features(self) -> bool:
        return bool(self.manifest.get("store_features"))

    @property
    def feature_shape(self) -> tuple[int, int]:
        t, d = self.manifest["feature_shape"]
        return int(t), int(d)

    def committed(self) -> tuple[int, int]:
        """(rows, feature_rows) as committed in SQLite."""
        got = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        return int(got["rows"]), int(got["feature_rows"])

    def embeddings(self) -> np.ndarray:
        """Read-only memory map of the committed ``[rows, E]`` float32 embeddings."""
        rows, _ = self.committed()
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.path / EMBEDDINGS, np.float32, "r", shape=(rows, self.dim))

    def features(self, feature_rows: Sequence[int]) -> np.ndarray:
        """Stored float16 vision tokens ``[len(feature_rows), T, Dv]``."""
        if not self.has_features:
            raise IndexFormatError(f"{self.path} was built without --store-features")
        _, n = self.committed()
        t, d = self.feature_shape
        mm = np.memmap(self.path / FEATURES, np.float16, "r", shape=(n, t, d))
        return np.asarray(mm[np.asarray(feature_rows, dtype=np.int64)])

    # -- reading ---------------------------------------------------------------------------

    def live_mask(self, kind: Kind) -> np.ndarray:
        """Boolean [rows]: live (not removed) items of ``kind``; cached until the next write."""
        rows, _ = self.committed()
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._cache is None or self._cache[:2] != (rows, version):
            kinds = np.zeros(rows, dtype=np.int8)  # 0 removed, 1 image, 2 text
            for row, k in self._db.execute("SELECT row, kind FROM items WHERE removed = 0"):
                if row < rows:
                    kinds[row] = 1 if k == "image" else 2
            self._cache = (rows, version, kinds == 1, kinds == 2)
        return self._cache[2] if kind == "image" else self._cache[3]

    def items_at_rows(self, rows: Sequence[int]) -> list[Item]:
        """Items at the given embedding rows, in that order."""
        found: dict[int, Item] = {}
        wanted = [int(r) for r in rows]
        for part in _batched(wanted, 500):
            marks = ",".join("?" * len(part))
            for rec in self._db.execute(f"{_SELECT} WHERE row IN ({marks})", part):
                item = _item(rec)
                found[item.row] = item
        return [found[r] for r in wanted]

    def items(self, *, include_removed: bool = False) -> Iterator[Item]:
        where = "" if include_removed else " WHERE removed = 0"
        for rec in self._db.execute(f"{_SELECT}{where} ORDER BY row"):
            yield _item(rec)

    def live_sources(self) -> set[str]:
        return {s for (s,) in self._db.execute("SELECT source FROM items WHERE removed = 0")}

    def removed_sources(self) -> set[str]:
        return {s for (s,) in self._db.execute("SELECT source FROM items WHERE removed = 1")}

    def skipped(self) -> list[tuple[str, str]]:
        return list(self._db.execute("SELECT source, reason FROM skipped ORDER BY source"))

    def counts(self) -> dict[str, int]:
        out = {"image": 0, "text": 0, "removed": 0}
        for kind, removed, n in self._db.execute(
            "SELECT kind, removed, COUNT(*) FROM items GROUP BY kind, removed"
        ):
            out["removed" if removed else kind] += n
        return out

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        items: Sequence[NewItem],
        embeddings: np.ndarray,
        features: np.ndarray | None = None,
        *,
        skipped: Iterable[tuple[str, str]] = (),
    ) -> list[int]:
        """Commit a batch: arrays first (fsynced), then the rows in one transaction.

        ``features`` [n_images, T, Dv] holds the image items' tokens in item order; it is
        required exactly when the index stores features. Returns the new item ids.
        """
        self._require_writable()
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape != (len(items), self.dim):
            raise ValueError(f"embeddings {emb.shape} do not match {len(items)} items")
        n_images = sum(it.kind == "image" for it in items)
        if self.has_features and (
            features is None or features.shape != (n_images, *self.feature_shape)
        ):
            got = None if features is None else features.shape
            raise ValueError(f"features {got} do not match {n_images} images")
        rows, frows = self.committed()
        _write_at(self.path / EMBEDDINGS, rows * self.dim * 4, emb.tobytes())
        if self.has_features and features is not None and n_images:
            t, d = self.feature_shape
            data = np.ascontiguousarray(features, dtype=np.float16).tobytes()
            _write_at(self.path / FEATURES, frows * t * d * 2, data)
        now = _now()
        ids: list[int] = []
        with self._transaction() as db:
            f = frows
            for j, it in enumerate(items):
                feature_row = None
                if it.kind == "image" and self.has_features:
                    feature_row, f = f, f + 1
                cur = db.execute(
                    "INSERT INTO items (row, kind, source, path, text, metadata, feature_row,"
                    " added) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rows + j,
                        it.kind,
                        it.source,
                        it.path,
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
            db.execute("UPDATE state SET value = ? WHERE key = 'rows'", (rows + len(items),))
            db.execute("UPDATE state SET value = ? WHERE key = 'feature_rows'", (f,))
        return ids

    def record_skipped(self, skipped: Iterable[tuple[str, str]]) -> None:
        self._require_writable()
        now = _now()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)", [(s, r, now) for s, r in skipped]
            )

    def remove(self, refs: Sequence[str | int]) -> tuple[list[Item], list[str | int]]:
        """Tombstone items by id (int or digit string) or by path/source; returns
        (removed items, refs that matched nothing live). All in one transaction."""
        self._require_writable()
        removed: list[Item] = []
        missing: list[str | int] = []
        with self._transaction() as db:
            for ref in refs:
                recs: list[Any] = []
                if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                    cur = db.execute(f"{_SELECT} WHERE removed = 0 AND id = ?", (int(ref),))
                    recs = cur.fetchall()
                if not recs and isinstance(ref, str):
                    keys = {ref, os.path.abspath(ref)}
                    marks = ",".join("?" * len(keys))
                    recs = db.execute(
                        f"{_SELECT} WHERE removed = 0 AND (path IN ({marks}) OR source IN"
                        f" ({marks}))",
                        [*keys, *keys],
                    ).fetchall()
                if not recs:
                    missing.append(ref)
                for rec in recs:
                    item = _item(rec)
                    db.execute("UPDATE items SET removed = 1 WHERE id = ?", (item.id,))
                    removed.append(item)
        return removed, missing

    # -- internals -------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._lock is None:
            raise IndexFormatError(f"{self.path} was opened read-only")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._cache = None  # PRAGMA data_version does not see this connection's own commits

    def _expected_sizes(self) -> list[tuple[Path, int]]:
        rows, frows = self.committed()
        sizes = [(self.path / EMBEDDINGS, rows * self.dim * 4)]
        if self.has_features:
            t, d = self.feature_shape
            sizes.append((self.path / FEATURES, frows * t * d * 2))
        return sizes

    def _check_sizes(self) -> None:
        for file, want in self._expected_sizes():
            have = file.stat().st_size if file.exists() else -1
            if have < want:
                raise IndexFormatError(
                    f"{file} has {have} bytes but the index committed {want}; the index is "
                    "damaged (was a file replaced or truncated?). Rebuild it"
                )

    def _truncate_uncommitted(self) -> None:
        """Drop bytes a killed writer appended but never committed."""
        self._check_sizes()
        for file, want in self._expected_sizes():
            if file.stat().st_size > want:
                with open(file, "r+b") as f:
                    f.truncate(want)
                    os.fsync(f.fileno())


_SELECT = "SELECT id, row, kind, source, path, text, metadata, feature_row FROM items"


def _item(rec: Sequence[Any]) -> Item:
    return Item(
        id=int(rec[0]),
        row=int(rec[1]),
        kind=rec[2],
        source=rec[3],
        path=rec[4],
        text=rec[5],
        metadata=json.loads(rec[6]),
        feature_row=None if rec[7] is None else int(rec[7]),
    )


def _clear_unfinished_create(root: Path) -> None:
    """A create killed before its manifest was written leaves only our own files: remove them."""
    ours = {EMBEDDINGS, FEATURES, DATABASE, LOCK, f"{DATABASE}-journal"}
    entries = list(root.iterdir())
    if entries and all(e.name in ours or e.name.startswith(f".{MANIFEST}.tmp-") for e in entries):
        for e in entries:
            e.unlink()


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in _transaction.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")
    return db


def _take_lock(root: Path) -> Any:
    f = open(root / LOCK, "a+b")  # noqa: SIM115 - held open for the index's lifetime
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise IndexBusyError(
                f"another process is writing {root}; wait for it to finish"
            ) from None
    return f


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _batched(xs: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
