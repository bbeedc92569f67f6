"""Usage metering: requests are summed in memory and flushed to the key store off the hot path.

A request adds to an in-memory row (key, UTC day, endpoint, model, status); a background task
hands the rows to the store once a second in one transaction (:meth:`KeyStore.add_usage`), and the
server's shutdown flushes the rest. So SIGTERM loses nothing and SIGKILL loses at most the last
second. A failed flush (disk full, store locked past its timeout) keeps the rows for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter

from blipitm.keys import KeyStore, UsageRow
from blipitm.keys.store import Slot, day_of

log = logging.getLogger("blipitm.server")

# The label of the names past the cap. A key name starts with a letter or digit, so no key can
# be called this (a key named "other" has its own label, never mixed with the overflow).
OTHER = "_other"


class UsageBuffer:
    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._rows: dict[Slot, UsageRow] = {}
        # Credits by (name, the key's credit_gen when billed): see KeyStore.add_usage.
        self._spent: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()  # one flush at a time (the timer's and shutdown's)

    def add(self, row: UsageRow, credit_gen: int = 0) -> None:
        old = self._rows.get(row.slot)
        self._rows[row.slot] = row if old is None else old + row
        if row.credits:
            slot = (row.name, credit_gen)
            self._spent[slot] = self._spent.get(slot, 0) + row.credits

    def pending(self, name: str) -> list[UsageRow]:
        """Rows of ``name`` not yet in the store (``/v1/usage`` adds them to the store's)."""
        return [r for r in self._rows.values() if r.name == name]

    async def usage(self, name: str, first: str | None = None) -> list[UsageRow]:
        """The store's rows of ``name`` (from day ``first``) and those not yet written, read with
        no flush in between: a flush moves rows from here to the store, so reading the two on
        either side of one would miss them (or count them twice)."""
        async with self._lock:
            stored = await asyncio.to_thread(self.store.usage, name, first)
            return [*stored, *self.pending(name)]

    @contextlib.asynccontextmanager
    async def spent(self, name: str) -> AsyncIterator[Callable[[], int]]:
        """Credits ``name`` has spent, as a function: the store's balance plus the rows not yet
        written. No flush runs inside the block, so calling it there counts every row once and
        also what ``add`` records meanwhile."""
        async with self._lock:
            stored = (await asyncio.to_thread(self.store.get, name)).credits_used
            yield lambda: stored + sum(r.credits for r in self.pending(name))

    async def flush(self) -> None:
        async with self._lock:
            rows, self._rows = self._rows, {}
            spent, self._spent = self._spent, {}
            if not rows:
                return
            by_gen = [(name, gen, n) for (name, gen), n in spent.items()]
            try:
                await asyncio.to_thread(self.store.add_usage, rows.values(), by_gen)
            except BaseException:
                for row in rows.values():  # back in front of what arrived meanwhile
                    old = self._rows.get(row.slot)
                    self._rows[row.slot] = row if old is None else row + old
                for slot, n in spent.items():
                    self._spent[slot] = self._spent.get(slot, 0) + n
                raise


class KeyMetrics:
    """Prometheus counters per key *name* (never the secret). Label cardinality is bounded: the
    first ``max_names`` names seen get their own label, every later one counts as ``other``."""

    def __init__(self, registry: CollectorRegistry, max_names: int) -> None:
        self.max_names = max_names
        self._names: set[str] = set()
        self.requests = Counter(
            "blipitm_key_requests",
            "Requests of metered API keys, by key name and status",
            ["key", "status"],
            registry=registry,
        )
        self.items = Counter(
            "blipitm_key_items",
            "Texts and images of successful requests, by key name",
            ["key", "kind"],
            registry=registry,
        )
        self.credits = Counter(
            "blipitm_key_credits", "Credits billed, by key name", ["key"], registry=registry
        )
        self.refused = Counter(
            "blipitm_key_refused",
            "Requests refused by a key's limits, by key name and reason",
            ["key", "reason"],
            registry=registry,
        )

    def label(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) < self.max_names:
            self._names.add(name)
            return name
        return OTHER

    def observe(self, row: UsageRow) -> None:
        key = self.label(row.name)
        self.requests.labels(key=key, status=str(row.status)).inc()
        if row.credits:
            self.credits.labels(key=key).inc(row.credits)
        if 200 <= row.status < 300:
            self.items.labels(key=key, kind="text").inc(row.texts)
            self.items.labels(key=key, kind="image").inc(row.images)


def usage_row(
    name: str,
    endpoint: str,
    status: int,
    *,
    texts: int,
    images: int,
    tokens: int,
    credits: int,
    started: float,
    model: str = "",
) -> UsageRow:
    """One finished request as a usage row (``started``: its ``time.perf_counter()``)."""
    return UsageRow(
        name=name,
        day=day_of(time.time()),
        endpoint=endpoint,
        status=status,
        requests=1,
        texts=texts,
        images=images,
        tokens=tokens,
        credits=credits,
        latency_ms=(time.perf_counter() - started) * 1000.0,
        model=model,
    )
