"""The key store: one SQLite file in WAL mode, so the CLI and running servers use it at once.

Two tables. ``keys``: one row per key name with the secret's hash, its limits, its credit grant
(``credit_limit``, NULL: unlimited) and what it has spent (``credits_used``). ``usage``: one row
per key, UTC day, endpoint and HTTP status with summed counters. A server adds its buffered usage
and the credits it spent in one transaction, so the balance and the usage rows always agree.

Every change to a key's row stamps it with the next value of a store-wide revision (triggers, so
no writer can forget), so a server reloads only the keys that changed. ``credit_gen`` counts the
times the balance was *set* (``keys update --credits``): spending a server billed before it saw the
new balance is added to the grant as well as to what is spent, so it does not eat into the new
balance. The file is created readable by its owner only (0600): it holds the secrets' hashes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from blipitm.common.sqlite import transaction
from blipitm.errors import BlipitmError, InvalidInputError
from blipitm.keys.secret import hash_secret, hint, new_secret


class UnknownKeyError(BlipitmError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no key named {name!r}; `blipitm keys list` shows the names")


class KeyExistsError(BlipitmError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"a key named {name!r} already exists (revoked keys keep their name and usage); "
            "choose another name"
        )


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()  # "leave as it is" in update(); None there means "no limit"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LIMITS = ("rpm", "items_per_minute", "concurrency")
MAX_INT = 2**63 - 1  # SQLite's largest integer: limits and balances stay integers below it

# The usage table, as a new store creates it and as an older one is migrated to.
_USAGE_TABLE = """CREATE TABLE IF NOT EXISTS usage (
    name TEXT NOT NULL,
    day TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    texts INTEGER NOT NULL,
    images INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, day, endpoint, model, status)
);
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    rpm INTEGER,
    items_per_minute INTEGER,
    concurrency INTEGER,
    credit_limit INTEGER,
    credits_used INTEGER NOT NULL DEFAULT 0,
    models TEXT,
    credit_gen INTEGER NOT NULL DEFAULT 0,
    rev INTEGER NOT NULL DEFAULT 0
);
{_USAGE_TABLE}CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('rev', 0);
"""

# Added to stores made before these columns existed.
_ADDED_COLUMNS = {
    "credit_gen": "INTEGER NOT NULL DEFAULT 0",
    "rev": "INTEGER NOT NULL DEFAULT 0",
}

# Stores made before usage was kept per model: the key gains `model` (a SQLite table's key
# cannot change in place, so the table is copied; the old rows are the model '').
_USAGE_BY_MODEL = f"""
ALTER TABLE usage RENAME TO usage_before_models;
{_USAGE_TABLE}INSERT INTO usage SELECT *, '' FROM usage_before_models;
DROP TABLE usage_before_models;
"""

_BUMP = """
    UPDATE meta SET value = value + 1 WHERE name = 'rev';
    UPDATE keys SET rev = (SELECT value FROM meta WHERE name = 'rev') WHERE name = NEW.name;
"""
# Setting only ``rev`` fires neither trigger (it is not in the column list).
_TRIGGERS = f"""
CREATE INDEX IF NOT EXISTS keys_by_rev ON keys (rev);
CREATE TRIGGER IF NOT EXISTS keys_rev_insert AFTER INSERT ON keys BEGIN {_BUMP} END;
CREATE TRIGGER IF NOT EXISTS keys_rev_update AFTER UPDATE OF name, hash, hint, created, expires,
    revoked, rpm, items_per_minute, concurrency, credit_limit, credits_used, models, credit_gen
    ON keys BEGIN {_BUMP} END;
"""


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored, without its secret. ``None`` limits mean unlimited."""

    name: str
    hash: bytes = dataclasses.field(repr=False)
    hint: str
    created: float
    expires: float | None = None
    revoked: float | None = None
    rpm: int | None = None
    items_per_minute: int | None = None
    concurrency: int | None = None
    credit_limit: int | None = None
    credits_used: int = 0
    models: tuple[str, ...] | None = None
    credit_gen: int = 0  # times the balance was set; see the module

    @property
    def credits_remaining(self) -> int | None:
        return None if self.credit_limit is None else self.credit_limit - self.credits_used

    def refusal(self, now: float) -> str | None:
        """Why this key cannot be used at ``now`` (revoked, expired), or None."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return None

    def allows_model(self, *names: str) -> bool:
        return self.models is None or any(n in self.models for n in names)

    def as_dict(self) -> dict[str, Any]:
        """For ``keys list --json`` and ``/v1/usage``: everything but the hash."""
        out = dataclasses.asdict(self)
        del out["hash"], out["credit_gen"]
        out["credits_remaining"] = self.credits_remaining
        out["models"] = list(self.models) if self.models is not None else None
        for name in ("created", "expires", "revoked"):
            out[name] = _iso(out[name])
        return out


Slot = tuple[str, str, str, str, int]  # name, day, endpoint, model, status


@dataclass(frozen=True)
class UsageRow:
    """Usage of one key on one UTC day, endpoint, model and status (summed)."""

    name: str
    day: str  # YYYY-MM-DD, UTC
    endpoint: str
    status: int
    requests: int = 0
    texts: int = 0
    images: int = 0
    tokens: int = 0
    credits: int = 0
    latency_ms: float = 0.0  # summed; divide by requests for the mean
    model: str = ""  # the served model's name; '' for a request that named no served model

    @property
    def slot(self) -> Slot:
        return self.name, self.day, self.endpoint, self.model, self.status

    def __add__(self, other: UsageRow) -> UsageRow:
        assert self.slot == other.slot
        return dataclasses.replace(
            self,
            requests=self.requests + other.requests,
            texts=self.texts + other.texts,
            images=self.images + other.images,
            tokens=self.tokens + other.tokens,
            credits=self.credits + other.credits,
            latency_ms=self.latency_ms + other.latency_ms,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInputError(
            "a key name is 1-64 characters: letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {name!r}",
            loc=("name",),
        )
    return name


def parse_date(value: str, field: str) -> float:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInputError(
            f"not a date: {value!r}; write YYYY-MM-DD or an ISO 8601 time "
            "such as 2027-01-31T12:00:00+00:00",
            loc=(field,),
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ts = parsed.timestamp()
    try:
        datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):  # 9999-12-31T23:00-05:00 is year 10000 in UTC
        raise InvalidInputError(
            f"{value!r} is after 9999-12-31T23:59:59 UTC, the last time the store can show; "
            "give an earlier date (or none)",
            loc=(field,),
        ) from None
    return ts


def _check_limit(value: Any, field: str, low: int) -> None:
    if value is None or value is UNSET:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_INT:
        raise InvalidInputError(
            f"must be an integer from {low} to {MAX_INT} (or none), got {value!r}", loc=(field,)
        )


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):  # stored before dates were checked
        return f"{ts:.0f} s after 1970 (past year 9999)"


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


class KeyStore:
    """The SQLite key store at ``path`` (created on first use).

    Every method opens its own short connection, so one store object serves any thread; WAL lets
    readers (a server reloading keys) run while a writer (the CLI, another server) commits.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidInputError(
                f"{self.path} is a directory; --keys-db names a file", loc=("keys_db",)
            )
        if not self.path.exists():
            if not create:
                raise InvalidInputError(
                    f"no key store at {self.path} (a typo?); `blipitm keys create NAME "
                    f"--keys-db {self.path}` creates it with its first key",
                    loc=("keys_db",),
                )
            self._create_file()
        with self._connect() as db:
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE keys ADD COLUMN {column} {kind}")
            with transaction(db):  # checked under the write lock: two servers may start at once
                if "model" not in {row[1] for row in db.execute("PRAGMA table_info(usage)")}:
                    for statement in _USAGE_BY_MODEL.split(";")[:-1]:
                        db.execute(statement)
            db.executescript(_TRIGGERS)

    def _create_file(self) -> None:
        """An empty file, owner-only (0600), before SQLite opens it: its -wal and -shm files get
        the same mode."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process created it meanwhile
        except OSError as e:
            raise InvalidInputError(
                f"cannot create the key store {self.path}: {e.strerror}", loc=("keys_db",)
            ) from None
        os.close(fd)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as e:
            raise InvalidInputError(
                f"cannot open the key store {self.path}: {e}", loc=("keys_db",)
            ) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db, transaction(db):
            yield db

    # -- keys -----------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        items_per_minute: int | None = None,
        concurrency: int | None = None,
        credits: int | None = None,
        expires: float | None = None,
        models: Sequence[str] | None = None,
    ) -> str:
        """Add a key; returns its secret, which is not stored and cannot be shown again."""
        validate_name(name)
        _check_limits(rpm=rpm, items_per_minute=items_per_minute, concurrency=concurrency)
        _check_limit(credits, "credits", 0)
        secret = new_secret()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone():
                raise KeyExistsError(name)
            db.execute(
                "INSERT INTO keys (name, hash, hint, created, expires, rpm, items_per_minute, "
                "concurrency, credit_limit, models) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    hash_secret(secret),
                    hint(secret),
                    time.time(),
                    expires,
                    rpm,
                    items_per_minute,
                    concurrency,
                    credits,
                    _models_json(models),
                ),
            )
        return secret

    def update(
        self,
        name: str,
        *,
        rpm: int | _Unset | None = UNSET,
        items_per_minute: int | _Unset | None = UNSET,
        concurrency: int | _Unset | None = UNSET,
        credits: int | _Unset | None = UNSET,
        add_credits: int = 0,
        expires: float | _Unset | None = UNSET,
        models: Sequence[str] | _Unset | None = UNSET,
    ) -> KeyRecord:
        """Change a key. ``credits`` sets the balance (what remains) to that number; None makes
        it unlimited; ``add_credits`` tops the balance up (or, negative, takes some away)."""
        _check_limits(rpm=rpm, items_per_minute=items_per_minute, concurrency=concurrency)
        _check_limit(credits, "credits", 0)
        if isinstance(add_credits, bool) or not isinstance(add_credits, int):
            raise InvalidInputError(
                f"must be an integer, got {add_credits!r}", loc=("add_credits",)
            )
        sets: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("rpm", rpm),
            ("items_per_minute", items_per_minute),
            ("concurrency", concurrency),
            ("expires", expires),
        ):
            if value is not UNSET:
                sets.append(f"{column} = ?")
                args.append(value)
        if models is not UNSET:
            assert not isinstance(models, _Unset)
            sets.append("models = ?")
            args.append(_models_json(models))
        if credits is not UNSET:
            # Relative to what is spent at commit time, so spending that lands meanwhile counts;
            # a new generation, so spending billed before a server saw this does not (module).
            sets.append(
                "credit_limit = CASE WHEN ? IS NULL THEN NULL ELSE credits_used + ? END, "
                "credit_gen = credit_gen + 1"
            )
            args += [credits, credits]
        with self._transaction() as db:
            current = self._get(db, name)
            _check_balance(current, credits, add_credits)
            if sets:
                db.execute(f"UPDATE keys SET {', '.join(sets)} WHERE name = ?", (*args, name))
            if add_credits:
                db.execute(
                    "UPDATE keys SET credit_limit = credit_limit + ? WHERE name = ?",
                    (add_credits, name),
                )
            record = self._get(db, name)
        return record

    def revoke(self, name: str) -> KeyRecord:
        """Revoke a key for good (it keeps its name and usage history)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                (time.time(), name),
            )
            record = self._get(db, name)
            if cursor.rowcount == 0 and record.revoked is None:  # pragma: no cover - raced
                raise UnknownKeyError(name)
        return record

    def get(self, name: str) -> KeyRecord:
        with self._connect() as db:
            return self._get(db, name)

    def records(self) -> list[KeyRecord]:
        return self.changed_since(-1)[1]

    def changed_since(self, rev: int) -> tuple[int, list[KeyRecord]]:
        """The store's revision now and the keys changed after ``rev`` (-1: every key), read in
        one snapshot: a server passes back the revision it got to reload only what changed."""
        with self._connect() as db:
            db.execute("BEGIN")  # one read snapshot for both queries
            (now,) = db.execute("SELECT value FROM meta WHERE name = 'rev'").fetchone()
            # No ORDER BY: sorting by name would scan every row instead of the index on rev.
            rows = db.execute(f"SELECT {_COLUMNS} FROM keys WHERE rev > ?", (rev,)).fetchall()
            db.execute("COMMIT")
        return int(now), sorted((_record(r) for r in rows), key=lambda r: r.name)

    def _get(self, db: sqlite3.Connection, name: str) -> KeyRecord:
        row = db.execute(f"SELECT {_COLUMNS} FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownKeyError(name)
        return _record(row)

    # -- usage ----------------------------------------------------------------------------------

    def add_usage(
        self, rows: Iterable[UsageRow], spent: Iterable[tuple[str, int, int]] | None = None
    ) -> None:
        """Add usage rows and charge their credits to their keys, in one transaction.

        ``spent``: (name, credit_gen, credits), the credits by the balance generation they were
        billed under; absent, the rows' credits count against the balance as it is now. Credits
        of an older generation (billed before the server saw ``keys update --credits``) are
        added to the grant too, so the balance that was set stands."""
        rows = list(rows)
        if not rows:
            return
        if spent is None:
            totals: dict[str, int] = {}
            for row in rows:
                totals[row.name] = totals.get(row.name, 0) + row.credits
            spent = [(name, -1, n) for name, n in totals.items()]
        with self._transaction() as db:
            db.executemany(
                f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, day, endpoint, model, status) DO UPDATE SET "
                "requests = requests + excluded.requests, texts = texts + excluded.texts, "
                "images = images + excluded.images, tokens = tokens + excluded.tokens, "
                "credits = credits + excluded.credits, "
                "latency_ms = latency_ms + excluded.latency_ms",
                [
                    (*r.slot, r.requests, r.texts, r.images, r.tokens, r.credits, r.latency_ms)
                    for r in rows
                ],
            )
            db.executemany(
                "UPDATE keys SET credits_used = credits_used + ?1, credit_limit = CASE "
                "WHEN ?2 >= 0 AND ?2 != credit_gen AND credit_limit IS NOT NULL "
                "THEN credit_limit + ?1 ELSE credit_limit END WHERE name = ?3",
                [(n, gen, name) for name, gen, n in spent if n],
            )

    def usage(self, name: str | None = None, since: str | date | None = None) -> list[UsageRow]:
        """Usage rows, oldest day first; ``since`` is a day (inclusive)."""
        where, args = [], []
        if name is not None:
            with self._connect() as db:
                self._get(db, name)  # an unknown name is an error, not an empty answer
            where.append("name = ?")
            args.append(name)
        if since is not None:
            where.append("day >= ?")
            args.append(since.isoformat() if isinstance(since, date) else since)
        sql = f"SELECT {_USAGE_FIELDS} FROM usage" + (
            " WHERE " + " AND ".join(where) if where else ""
        )
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY day, name, endpoint, model, status", args)
            return [UsageRow(*r) for r in rows.fetchall()]


# The usage table's columns in the order of a slot and then the sums (what add_usage writes),
# and in UsageRow's field order (what usage reads).
_USAGE_COLUMNS = (
    "name, day, endpoint, model, status, requests, texts, images, tokens, credits, latency_ms"
)
_USAGE_FIELDS = ", ".join(f.name for f in dataclasses.fields(UsageRow))

_COLUMNS = (
    "name, hash, hint, created, expires, revoked, rpm, items_per_minute, concurrency, "
    "credit_limit, credits_used, credit_gen, models"
)


def _record(row: tuple[Any, ...]) -> KeyRecord:
    models = row[-1]
    fields = dict(zip(_COLUMNS.split(", ")[:-1], row[:-1], strict=True))
    return KeyRecord(**fields, models=None if models is None else tuple(json.loads(models)))


def _check_balance(record: KeyRecord, credits: int | _Unset | None, add_credits: int) -> None:
    """Refuse a balance SQLite cannot hold as an integer (it would turn it into a float)."""
    if isinstance(credits, int) and record.credits_used + credits > MAX_INT:
        raise InvalidInputError(
            f"a balance of {credits} on top of the {record.credits_used} spent is more than "
            f"the store holds ({MAX_INT} in all)",
            loc=("credits",),
        )
    if not add_credits:
        return
    limit = record.credit_limit
    if isinstance(credits, int):
        limit = record.credits_used + credits
    elif credits is None:
        limit = None
    if limit is None:
        raise InvalidInputError(
            f"key {record.name!r} has unlimited credits; set a balance with --credits N",
            loc=("add_credits",),
        )
    if not -MAX_INT <= limit + add_credits <= MAX_INT:
        raise InvalidInputError(
            f"adding {add_credits} to a grant of {limit} leaves the range the store holds "
            f"(-{MAX_INT} to {MAX_INT})",
            loc=("add_credits",),
        )


def _models_json(models: Sequence[str] | None) -> str | None:
    if models is None:
        return None
    models = [m.strip() for m in models]
    if not models or not all(models):
        raise InvalidInputError("name at least one model, none empty", loc=("models",))
    return json.dumps(models)


def _check_limits(**limits: Any) -> None:
    for field in _LIMITS:
        _check_limit(limits[field], field, 1)
