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
(``removed = 1``), which every query filters out.

This module is the facade that keeps the folder, the manifest and the writer lock; the array
files are arrays.py, the SQLite catalogue catalog.py, and what is checked on open and by
``verify`` integrity.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blipitm.common.files import atomic_write_bytes, json_bytes
from blipitm.common.identity import mismatch, model_record
from blipitm.common.safeio import loads_json
from blipitm.common.sqlite import transaction
from blipitm.common.version import __version__
from blipitm.retrieval import arrays, catalog
from blipitm.retrieval.arrays import EMBEDDINGS, FEATURES, refuse_non_finite
from blipitm.retrieval.catalog import DATABASE, SELECT, Item, Kind, NewItem, connect
from blipitm.retrieval.errors import (
    IndexBusyError,
    IndexDamagedError,
    IndexFormatError,
    IndexMismatchError,
)
from blipitm.retrieval.integrity import Batch, check_checksums, check_tiling, digest, parse_manifest

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine

try:  # POSIX advisory locks; elsewhere single-writer discipline is the user's job.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "blipitm-index"
FORMAT_VERSION = 2  # 2: checksums (batches, meta) and relpath; 1 is refused with "rebuild"
MANIFEST = "manifest.json"
LOCK = "lock"

__all__ = ["DATABASE", "EMBEDDINGS", "FEATURES", "MANIFEST", "Index", "Item", "Kind", "NewItem"]


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
        db = connect(root / DATABASE)
        db.executescript(catalog.SCHEMA)
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
                db = connect(root / DATABASE)
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
        return catalog.committed(self._db, self.path)

    def embeddings(self) -> np.ndarray:
        """Read-only memory map of the committed ``[rows, E]`` float32 embeddings."""
        rows, _ = self.committed()
        return arrays.read_embeddings(self.path / EMBEDDINGS, rows, self.dim)

    def features(self, feature_rows: Sequence[int]) -> np.ndarray:
        """Stored float16 vision tokens ``[len(feature_rows), T, Dv]``."""
        if not self.has_features:
            raise IndexFormatError(f"{self.path} was built without --store-features")
        _, n = self.committed()
        return arrays.read_features(self.path / FEATURES, n, self.feature_shape, feature_rows)

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
            for rec in self._query(f"{SELECT} WHERE row IN ({marks})", part):
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
        for rec in self._query(f"{SELECT}{where} ORDER BY row"):
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
        refuse_non_finite(emb, "embeddings")
        if feats is not None:
            refuse_non_finite(feats, "features")
        rows, frows = self.committed()
        emb_bytes = emb.tobytes()
        feat_bytes = b"" if feats is None else feats.tobytes()
        arrays.write_at(self.path / EMBEDDINGS, rows * self.dim * 4, emb_bytes)
        if feat_bytes:
            t, d = self.feature_shape
            arrays.write_at(self.path / FEATURES, frows * t * d * 2, feat_bytes)
        checksums = (digest(emb_bytes), digest(feat_bytes) if self.has_features else None)
        with self._transaction() as db:
            return catalog.insert_batch(
                db,
                items,
                rows=rows,
                feature_rows=frows,
                has_features=self.has_features,
                checksums=checksums,
                skipped=skipped,
            )

    def record_skipped(self, skipped: Iterable[tuple[str, str]]) -> None:
        self._require_writable()
        with self._transaction() as db:
            catalog.record_skipped(db, skipped)

    def remove(self, refs: Sequence[str | int]) -> tuple[list[Item], list[str | int]]:
        """Tombstone items by id (int or digit string) or by path/source; returns
        (removed items, refs that matched nothing live). All in one transaction."""
        self._require_writable()
        with self._transaction() as db:
            return catalog.tombstone(db, self.path, refs)

    # -- internals -------------------------------------------------------------------------

    def _reading(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Turn SQLite's errors on a damaged file into one line naming the index."""
        return catalog.reading(self.path, what)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reading("read the items"):
            return self._db.execute(sql, params).fetchall()

    def _item(self, rec: Sequence[Any]) -> Item:
        return catalog.parse_item(self.path, rec)

    def _check_database(self, manifest_raw: bytes) -> None:
        """The catalogue is whole and was written with this manifest (catalog.py)."""
        catalog.check_database(self._db, self.path, digest(manifest_raw), MANIFEST)

    def _check_batches(self, *, features: bool) -> list[Batch]:
        """Each committed batch's bytes against its checksum: embeddings always, features when
        asked (verify)."""
        rows, frows = self.committed()
        batches = catalog.committed_batches(self._db, self.path, rows)
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
        with transaction(self._db) as db:
            yield db
        self._cache = None  # PRAGMA data_version does not see this connection's own commits

    def _expected_sizes(self) -> list[tuple[Path, int]]:
        rows, frows = self.committed()
        sizes = [(self.path / EMBEDDINGS, rows * self.dim * 4)]
        if self.has_features:
            t, d = self.feature_shape
            sizes.append((self.path / FEATURES, frows * t * d * 2))
        return sizes

    def _check_sizes(self) -> None:
        arrays.check_sizes(self.path, self._expected_sizes())

    def _truncate_uncommitted(self) -> None:
        """Drop bytes a killed writer appended but never committed (sizes checked first)."""
        arrays.truncate_uncommitted(self._expected_sizes())


def _clear_unfinished_create(root: Path) -> None:
    """A create killed before its manifest was written leaves only our own files: remove them."""
    ours = {EMBEDDINGS, FEATURES, DATABASE, LOCK, f"{DATABASE}-journal"}
    entries = list(root.iterdir())
    if entries and all(e.name in ours or e.name.startswith(f".{MANIFEST}.tmp-") for e in entries):
        for e in entries:
            e.unlink()


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


def _batched(xs: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
