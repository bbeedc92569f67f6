"""The on-disk index: one folder, append-only arrays plus SQLite metadata.

Layout::

    INDEX/manifest.json    model record (identity.py), dims, feature layout, blipitm version
    INDEX/embeddings.f32   [rows, E] float32, raw and memory-mappable; row r <-> items.row = r
    INDEX/features.f16     [feature_rows, T, Dv] float16 vision tokens (only with store_features)
    INDEX/index.sqlite     items, skipped sources, the committed row counts (table state), each
                           batch's checksums (batches) and the manifest's (meta)
    INDEX/lock             flock()ed by the one process allowed to write

Crash safety (SIGKILL at any instant leaves a consistent index): a batch is appended to the
array files and fsynced *first*, then its rows and the new row counts are committed in one SQLite
transaction. The counts in SQLite are the truth: bytes beyond them are an unfinished batch and a
writer truncates them on open; readers never look past them. Removal marks rows as tombstones
(``removed = 1``), which every query filters out. What is checked on open and by ``verify``:
integrity.py.
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from blipitm.common.files import atomic_write_bytes, json_bytes
from blipitm.common.identity import mismatch, model_record
from blipitm.common.safeio import loads_json
from blipitm.common.version import __version__
from blipitm.errors import InvalidInputError
from blipitm.retrieval.errors import (
    IndexBusyError,
    IndexDamagedError,
    IndexFormatError,
    IndexMismatchError,
)
from blipitm.retrieval.integrity import (
    Batch,
    check_checksums,
    check_tiling,
    digest,
    parse_manifest,
)

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine

try:  # POSIX advisory locks; elsewhere single-writer discipline is the user's job.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "blipitm-index"
FORMAT_VERSION = 2  # 2: checksums (batches, meta) and relpath; 1 is refused with "rebuild"
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
_SCHEMA_PROBES = (
    "SELECT id, row, kind, source, path, relpath, text, metadata, feature_row, removed, added"
    " FROM items LIMIT 0",
    "SELECT source, reason, at FROM skipped LIMIT 0",
    "SELECT key, value FROM state LIMIT 0",
    "SELECT first_row, rows, first_feature_row, feature_rows, embeddings_sha256,"
    " features_sha256 FROM batches LIMIT 0",
    "SELECT key, value FROM meta LIMIT 0",
)


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
        cls,
        path: str | os.PathLike[str],
        engine: Engine,
        *,
        store_features: bool = False,
        build_sources: Sequence[str] | None = None,
    ) -> Index:
        """Create an empty index for ``engine``'s model at ``path`` (absent or empty folder).

        ``build_sources`` (absolute paths) records what the build that creates it reads, so that
        rerunning that build resumes it and another build onto it is refused
        (:meth:`build_sources`)."""
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
        n_tokens = engine.info.image_tokens
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "blipitm_version": __version__,
            "model": model_record(engine),
            "embedding_dim": engine.embedding_dim,
            "embedding_dtype": "float32",
            "store_features": store_features,
            "feature_shape": [n_tokens, vision.hidden_size] if store_features else None,
            "feature_dtype": "float16" if store_features else None,
        }
        raw = json_bytes(manifest)
        (root / EMBEDDINGS).touch()
        if store_features:
            (root / FEATURES).touch()
        db = _connect(root / DATABASE)
        db.executescript(_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('manifest_sha256', ?)", (digest(raw),))
        if build_sources is not None:
            db.execute(
                "INSERT INTO meta VALUES ('build_sources', ?)", (json.dumps(list(build_sources)),)
            )
        # The manifest goes last: a folder without one is a build that never started.
        atomic_write_bytes(root / MANIFEST, raw)
        db.close()
        return cls.open(root, engine, writable=True)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], engine: Engine | None = None, *, writable: bool = False
    ) -> Index:
        """Open an index; with ``engine``, refuse (IndexMismatchError) if it is another model.

        Checks what is cheap (integrity.py) and raises IndexFormatError / IndexDamagedError
        naming the index and what is wrong. ``writable`` takes the writer lock and drops any
        batch a killed writer left half-written. Readers take no lock and see only committed
        rows.
        """
        root = Path(path)
        if not root.is_dir():
            raise IndexFormatError(
                f"index {root} does not exist; create it with "
                f"'blipitm index build SRC --out {root}'"
            )
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise IndexFormatError(
                f"{root} is not a blipitm index (no {MANIFEST}); create one with "
                "'blipitm index build SRC --out INDEX'"
            )
        raw = manifest_path.read_bytes()
        manifest = parse_manifest(root, raw, format_name=FORMAT, version=FORMAT_VERSION)
        if not (root / DATABASE).is_file():  # sqlite3.connect would create an empty one
            raise IndexDamagedError(f"index {root}: {DATABASE} is missing; rebuild the index")
        lock = _take_lock(root) if writable else None
        index: Index | None = None
        try:
            try:
                db = _connect(root / DATABASE)
            except sqlite3.DatabaseError as e:
                raise IndexDamagedError(
                    f"index {root}: cannot open its database: {DATABASE} is damaged ({e}); "
                    "rebuild the index"
                ) from None
            index = cls(root, manifest, db, lock)
            # The manifest is trusted (for the model check) only once its checksum matched.
            index._check_database(raw)
            if engine is not None:
                why = mismatch(manifest["model"], engine)
                if why is not None:
                    raise IndexMismatchError(f"cannot use index {root} with this model: {why}")
            index._check_sizes()
            if writable:
                index._truncate_uncommitted()
            index._check_batches(features=False)
        except BaseException:
            if index is not None:
                index.close()
            elif lock is not None:
                lock.close()
            raise
        return index

    def verify(self) -> dict[str, int]:
        """Check everything (integrity.py): SQLite's integrity check and the checksums of every
        committed batch, features included. Raises IndexDamagedError on the first problem;
        returns what was checked."""
        with self._reading("run SQLite's integrity check"):
            problems = [r for (r,) in self._db.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise IndexDamagedError(
                f"index {self.path}: {DATABASE} fails SQLite's integrity check "
                f"({'; '.join(problems[:3])}); rebuild the index"
            )
        batches = self._check_batches(features=True)
        rows, frows = self.committed()
        return {"rows": rows, "feature_rows": frows, "batches": len(batches)}

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
        with self._reading("read the committed row counts"):
            got = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        if not {"rows", "feature_rows"} <= got.keys():
            raise IndexDamagedError(
                f"index {self.path}: the committed row counts are missing from {DATABASE}; "
                "rebuild the index"
            )
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
        (version,) = self._query("PRAGMA data_version")[0]
        cache = self._cache
        if cache is None or cache[:2] != (rows, version):
            kinds = np.zeros(rows, dtype=np.int8)  # 0 removed, 1 image, 2 text
            for row, k in self._query("SELECT row, kind FROM items WHERE removed = 0"):
                if row < rows:
                    kinds[row] = 1 if k == "image" else 2
            cache = self._cache = (rows, version, kinds == 1, kinds == 2)
        return cache[2] if kind == "image" else cache[3]

    def items_at_rows(self, rows: Sequence[int]) -> list[Item]:
        """Items at the given embedding rows, in that order."""
        found: dict[int, Item] = {}
        wanted = [int(r) for r in rows]
        for part in _batched(wanted, 500):
            marks = ",".join("?" * len(part))
            for rec in self._query(f"{_SELECT} WHERE row IN ({marks})", part):
                item = self._item(rec)
                found[item.row] = item
        missing = [r for r in wanted if r not in found]
        if missing:
            raise IndexDamagedError(
                f"index {self.path}: no item for committed rows {missing[:5]}; rebuild the index"
            )
        return [found[r] for r in wanted]

    def items(self, *, include_removed: bool = False) -> Iterator[Item]:
        where = "" if include_removed else " WHERE removed = 0"
        for rec in self._query(f"{_SELECT}{where} ORDER BY row"):
            yield self._item(rec)

    def live_sources(self) -> set[str]:
        return {s for (s,) in self._query("SELECT source FROM items WHERE removed = 0")}

    def removed_sources(self) -> set[str]:
        return {s for (s,) in self._query("SELECT source FROM items WHERE removed = 1")}

    def build_sources(self) -> list[str] | None:
        """The sources the build that created the index read (absolute paths), or None when it
        did not record them (created by Index.create directly, or by blipitm 0.x before)."""
        rec = self._query("SELECT value FROM meta WHERE key = 'build_sources'")
        if not rec:
            return None
        try:
            value = loads_json(rec[0][0])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise IndexDamagedError(
                f"index {self.path}: its recorded build sources are not a list of paths; "
                "rebuild the index"
            )
        return value

    def skipped(self) -> list[tuple[str, str]]:
        return [
            (s, r) for s, r in self._query("SELECT source, reason FROM skipped ORDER BY source")
        ]

    def counts(self) -> dict[str, int]:
        out = {"image": 0, "text": 0, "removed": 0}
        for kind, removed, n in self._query(
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
        required exactly when the index stores features and the batch has images. Returns the
        new item ids. Non-finite values are refused (InvalidInputError) before anything is
        written.
        """
        self._require_writable()
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape != (len(items), self.dim):
            raise ValueError(f"embeddings {emb.shape} do not match {len(items)} items")
        n_images = sum(it.kind == "image" for it in items)
        feats = None
        if self.has_features and (features is not None or n_images):  # None: a text batch
            if features is None or features.shape != (n_images, *self.feature_shape):
                got = None if features is None else features.shape
                raise ValueError(f"features {got} do not match {n_images} images")
            with np.errstate(over="ignore"):  # an overflow to inf is refused just below
                feats = np.ascontiguousarray(features, dtype=np.float16)
        _refuse_non_finite(emb, "embeddings")
        if feats is not None:
            _refuse_non_finite(feats, "features")
        rows, frows = self.committed()
        emb_bytes = emb.tobytes()
        feat_bytes = b"" if feats is None else feats.tobytes()
        _write_at(self.path / EMBEDDINGS, rows * self.dim * 4, emb_bytes)
        if feat_bytes:
            t, d = self.feature_shape
            _write_at(self.path / FEATURES, frows * t * d * 2, feat_bytes)
        now = _now()
        ids: list[int] = []
        with self._transaction() as db:
            f = frows
            for j, it in enumerate(items):
                feature_row = None
                if it.kind == "image" and self.has_features:
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
                    (
                        rows,
                        len(items),
                        frows,
                        f - frows,
                        digest(emb_bytes),
                        digest(feat_bytes) if self.has_features else None,
                    ),
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
                    item = self._item(rec)
                    db.execute("UPDATE items SET removed = 1 WHERE id = ?", (item.id,))
                    removed.append(item)
        return removed, missing

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn SQLite's errors on a damaged file into one line naming the index."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise IndexDamagedError(
                f"index {self.path}: cannot {what}: {DATABASE} is damaged ({e}); rebuild the index"
            ) from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reading("read the items"):
            return self._db.execute(sql, params).fetchall()

    def _item(self, rec: Sequence[Any]) -> Item:
        try:
            metadata = loads_json(rec[7])
        except (TypeError, ValueError):
            metadata = None
        if not isinstance(metadata, dict):
            raise IndexDamagedError(
                f"index {self.path}: the metadata of item {rec[0]} is not a JSON object; "
                "rebuild the index"
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

    def _check_database(self, manifest_raw: bytes) -> None:
        """The schema is there, the manifest is the one written at creation, the row counts
        agree with the items, and every item's metadata is a JSON object."""
        with self._reading("open its database"):
            for probe in _SCHEMA_PROBES:
                self._db.execute(probe)
            recorded = self._db.execute(
                "SELECT value FROM meta WHERE key = 'manifest_sha256'"
            ).fetchone()
            n_items, last_row, n_frows, last_frow = self._db.execute(
                "SELECT COUNT(*), MAX(row), COUNT(feature_row), MAX(feature_row) FROM items"
            ).fetchone()
            bad_meta = self._db.execute(
                "SELECT id FROM items WHERE CASE WHEN json_valid(metadata)"
                " THEN json_type(metadata) != 'object' ELSE 1 END LIMIT 1"
            ).fetchone()
        if recorded is None or recorded[0] != digest(manifest_raw):
            raise IndexDamagedError(
                f"index {self.path}: {MANIFEST} is not the one written when the index was "
                "built (was it edited?); restore it or rebuild the index"
            )
        rows, frows = self.committed()
        # Rows are appended densely (0..rows-1) and never deleted; a concurrent writer may have
        # committed more since committed() read the counts, never fewer.
        if (
            n_items < rows
            or (rows and last_row != n_items - 1)
            or n_frows < frows
            or (frows and last_frow != n_frows - 1)
        ):
            raise IndexDamagedError(
                f"index {self.path}: {DATABASE} lists {n_items} items for {rows} committed rows; "
                "rebuild the index"
            )
        if bad_meta is not None:
            raise IndexDamagedError(
                f"index {self.path}: the metadata of item {bad_meta[0]} is not a JSON object; "
                "rebuild the index"
            )

    def _check_batches(self, *, features: bool) -> list[Batch]:
        """Each committed batch's bytes against its checksum: embeddings always, features when
        asked (verify)."""
        rows, frows = self.committed()
        with self._reading("read the batch checksums"):
            recs = self._db.execute(
                "SELECT * FROM batches WHERE first_row < ? ORDER BY first_row", (rows,)
            ).fetchall()
        batches = [Batch(*rec) for rec in recs]
        check_tiling(self.path, batches, rows, frows)
        check_checksums(self.path, batches, self.path / EMBEDDINGS, self.dim * 4)
        if features and self.has_features:
            t, d = self.feature_shape
            check_checksums(self.path, batches, self.path / FEATURES, t * d * 2, features=True)
        return batches

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
            if not file.is_file():
                raise IndexDamagedError(
                    f"index {self.path}: {file.name} is missing; rebuild the index"
                )
            have = file.stat().st_size
            if have < want:
                raise IndexDamagedError(
                    f"index {self.path}: {file.name} has {have} bytes but the index committed "
                    f"{want} (was it replaced or truncated?); rebuild the index"
                )

    def _truncate_uncommitted(self) -> None:
        """Drop bytes a killed writer appended but never committed (sizes checked first)."""
        for file, want in self._expected_sizes():
            if file.stat().st_size > want:
                with open(file, "r+b") as f:
                    f.truncate(want)
                    os.fsync(f.fileno())


_SELECT = "SELECT id, row, kind, source, path, relpath, text, metadata, feature_row FROM items"


def _refuse_non_finite(array: np.ndarray, name: str) -> None:
    """NaN or inf would make every later ranking meaningless: refuse them at the door."""
    finite = np.isfinite(array).all(axis=tuple(range(1, array.ndim)))  # per item
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5].tolist()
        raise InvalidInputError(
            f"items {bad} of this batch have non-finite values (NaN or inf); an index never "
            "stores them",
            loc=(name,),
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
