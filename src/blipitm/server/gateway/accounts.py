"""Per-key API keys in the server: who is calling, what they may still do, what they did.

:class:`KeyService` holds the keys of the store in memory (reloaded every second, so the CLI's
``create``, ``update`` and ``revoke`` apply within about a second and no request waits on the
disk), the limiter (in-process, or Redis with ``--redis``), the usage buffer and the per-key
metrics. :class:`Charge` is one request's :class:`~blipitm.server.account.Account`: admitted by
the gateway's middleware, its items and credits reserved by the request context
(``RequestContext.inputs``) from what the body declares, settled when the response is complete
(billed on 2xx; otherwise the inference work that was done is billed and the rest refunded,
whether the client went away or the deadline passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from blipitm.keys import KeyRecord, KeyStore, hash_secret
from blipitm.server.account import SCOPE_ACCOUNT, LimiterUnavailable
from blipitm.server.errors import OverLimit
from blipitm.server.family import ModelSpec, Price
from blipitm.server.gateway.limits import (
    Limiter,
    LocalLimiter,
    Verdict,
    Window,
    rate_headers,
    refusal_headers,
)
from blipitm.server.gateway.metering import KeyMetrics, UsageBuffer, usage_row
from blipitm.server.gateway.redis_limits import RedisLimiter
from blipitm.server.gateway.verdict import INVALID, Metered, Refused
from blipitm.server.settings import ServerSettings

log = logging.getLogger("blipitm.server")

FLUSH_S = 1.0  # usage reaches the store within this (plus the write); SIGKILL loses at most this


class KeyService:
    def __init__(self, settings: ServerSettings, registry: CollectorRegistry) -> None:
        assert settings.keys_db is not None
        self.store = KeyStore(settings.keys_db, create=False)  # a mistyped path is an error
        self.image_credits = settings.image_credits
        self.limiter_window_s = settings.rate_window_s
        self.limiter: Limiter
        if settings.redis_url is not None:
            slot_ttl = 2 * (settings.request_timeout_s + settings.drain_timeout_s) + 30
            self.limiter = RedisLimiter(
                settings.redis_url, settings.rate_window_s, slot_ttl, floor=self.spent_for_certain
            )
        else:
            self.limiter = LocalLimiter(settings.rate_window_s)
        self.buffer = UsageBuffer(self.store)
        self.metrics = KeyMetrics(registry, settings.metrics_key_labels)
        self._by_hash: dict[bytes, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._rev = -1  # the store revision loaded: reloads read only keys changed after it
        self._usage_active: dict[str, int] = {}  # /v1/usage requests in progress, per key
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.reload()
        if isinstance(self.limiter, RedisLimiter):
            await self.limiter.ping()  # a wrong --redis fails at start-up, not per request
        log.info(
            "key store %s: %d key(s); limits kept %s",
            self.store.path,
            len(self._by_name),
            "in Redis" if isinstance(self.limiter, RedisLimiter) else "in this process",
        )
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """The shutdown path (after the drain): the last usage goes to the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.buffer.flush()
        except Exception as e:
            log.error("could not write the last usage to the key store: %s", e)
        try:
            await self.limiter.heartbeat()  # a last try at settles that failed
        except LimiterUnavailable as e:
            log.error("could not settle the last requests in Redis (their TTL frees them): %s", e)
        await self.limiter.close()

    def spent_for_certain(self, key: KeyRecord) -> AbstractAsyncContextManager[Callable[[], int]]:
        """What ``key`` has spent: the store's balance plus this replica's usage not yet written
        there (under the flush lock, so a flush under way is counted once)."""
        return self.buffer.spent(key.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.limiter.heartbeat()  # settles that failed, state Redis lost
            except LimiterUnavailable as e:  # the usage is written all the same
                log.warning("rate-limit store not reached this time (retrying): %s", e)
            try:
                await self.buffer.flush()
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a locked or full disk: keep serving, retry next second
                log.warning("key store not updated this time (retrying): %s", e)

    async def reload(self) -> int:
        """Pick up the keys changed since the last reload; returns how many."""
        rev, records = await asyncio.to_thread(self.store.changed_since, self._rev)
        for record in records:
            old = self._by_name.get(record.name)
            if old is not None and old.hash != record.hash:
                del self._by_hash[old.hash]
            self._by_name[record.name] = record
            self._by_hash[record.hash] = record
        self._rev = rev
        return len(records)

    # -- per request ----------------------------------------------------------------------------

    def authenticate(self, token: str) -> Metered | Refused:
        """The key ``token`` is the secret of, or why it is refused (never echoing the token)."""
        digest = hash_secret(token)
        record = self._by_hash.get(digest)
        # The lookup is by SHA-256 of a 256-bit secret: its timing can reveal bits of a hash,
        # which do not help find a secret. The final comparison is constant-time all the same.
        if record is None or not hmac.compare_digest(record.hash, digest):
            return Refused(INVALID)
        reason = record.refusal(time.time())
        if reason is not None:
            return Refused(
                f"this API key has been {reason}"
                if reason == "revoked"
                else "this API key has expired"
            )
        return Metered(record)

    def current(self, name: str) -> KeyRecord | None:
        return self._by_name.get(name)

    def open(self, key: KeyRecord, endpoint: str) -> Charge:
        return Charge(self, key, endpoint)

    @contextlib.contextmanager
    def usage_slot(self, key: KeyRecord) -> Iterator[bool]:
        """A slot for ``GET /v1/usage``: apart from the model requests (a key at its limit can
        still ask what it has left) but capped at the key's ``--concurrency`` too (it reads the
        store). Yields False when the key already has that many in progress here."""
        active = self._usage_active.get(key.name, 0)
        if key.concurrency is not None and active >= key.concurrency:
            yield False
            return
        self._usage_active[key.name] = active + 1
        try:
            yield True
        finally:
            left = self._usage_active[key.name] - 1
            if left:
                self._usage_active[key.name] = left
            else:
                del self._usage_active[key.name]

    def record(self, charge: Charge, status: int, spent: int) -> None:
        row = usage_row(
            charge.key.name,
            charge.endpoint,
            status,
            texts=charge.texts,
            images=charge.images,
            tokens=charge.tokens if 200 <= status < 300 else 0,
            credits=spent,
            started=charge.started,
            model=charge.model,
        )
        # The balance generation the server knows now: spending billed before it saw a new
        # balance (keys update --credits) does not eat into it.
        current = self.current(charge.key.name) or charge.key
        self.buffer.add(row, current.credit_gen)
        self.metrics.observe(row)


@dataclass
class Charge:
    """One request of a metered key."""

    service: KeyService
    key: KeyRecord
    endpoint: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    texts: int = 0
    images: int = 0
    price: Price = field(default_factory=Price)  # the request's model's, set by reserve()
    model: str = ""  # the request's model's name, set by reserve() ('' before: never resolved)
    factor: float = 1.0  # share of the price billed (a Batch API line: --batch-credit-factor)
    credits: int = 0  # reserved, billed on success
    done: int = 0  # credits of the work the inference worker took (billed whatever the status)
    tokens: int = 0  # the response's usage.total_tokens, as the route computed it
    admitted: bool = False
    requests: Window | None = None
    items: Window | None = None

    @property
    def headers(self) -> dict[str, str]:
        return rate_headers(self.requests, self.items)

    def _note(self, verdict: Verdict) -> None:
        self.requests = verdict.requests or self.requests
        self.items = verdict.items or self.items

    async def admit(self) -> Verdict:
        """Rate and concurrency check before the body is read; refusals are recorded here."""
        verdict = await self.service.limiter.admit(self.key, self.request_id)
        self._note(verdict)
        self.admitted = verdict.allowed
        if not verdict.allowed:
            self.service.metrics.refused.labels(
                key=self.service.metrics.label(self.key.name), reason=str(verdict.refusal)
            ).inc()
            self.service.record(self, 429, 0)
        return verdict

    @property
    def owner(self) -> str | None:
        return self.key.name

    def allows(self, *names: str) -> bool:
        return self.key.allows_model(*names)

    async def reserve(self, texts: int, images: int, model: ModelSpec | None = None) -> None:
        """Take the request's items and credits (at ``model``'s price; without one, 1 per text and
        ``--image-credits`` per image) before any work; :class:`OverLimit` (429) if a limit
        refuses. The usage is metered under the model's name."""
        assert self.credits == 0, "one reservation per request"
        self.price = Price(1, self.service.image_credits) if model is None else model.price
        self.model = "" if model is None else model.name
        needed = self._credits(texts, images)
        # Only what the balance may hold: a refused request bills nothing, a refunded one gives
        # back exactly what it took.
        key = self.service.current(self.key.name) or self.key
        verdict = await self.service.limiter.reserve(key, self.request_id, texts + images, needed)
        self._note(verdict)
        self.texts, self.images = texts, images
        if not verdict.allowed:
            self.service.metrics.refused.labels(
                key=self.service.metrics.label(self.key.name), reason=str(verdict.refusal)
            ).inc()
            # The gateway's middleware adds the x-ratelimit-* headers.
            raise OverLimit(verdict.message, str(verdict.refusal), refusal_headers(verdict))
        self.credits = needed

    def worked(self, texts: int | None = None, images: int | None = None) -> None:
        """The inference worker took a job of this request (``texts`` and ``images``; None: all
        of the request's): its credits are billed even if the client leaves or the deadline
        passes, since the compute is spent. Work never started is refunded."""
        texts = self.texts if texts is None else texts
        images = self.images if images is None else images
        self.done = min(self.credits, self.done + self._credits(texts, images))

    def _credits(self, texts: int, images: int) -> int:
        """At the model's price, times the batch discount (rounded up: never under-billed)."""
        return math.ceil(
            round(self.factor * (texts * self.price.text + images * self.price.image), 9)
        )

    def bill(self, tokens: int) -> None:
        self.tokens = tokens  # metered with the request

    def spent(self, status: int) -> int:
        """What the request is billed: everything on a 2xx, else the work the worker did."""
        return self.credits if 200 <= status < 300 else self.done

    async def finish(self, status: int) -> None:
        """Settle after the response: bill a 2xx, else bill the work done and refund the rest
        (499: the client left). The usage is recorded first, so the billing is never lost when
        the limiter cannot be told (Redis retries it)."""
        if not self.admitted:
            return
        self.admitted = False  # settled once, whoever calls again
        spent = self.spent(status)
        self.service.record(self, status, spent)
        await self.service.limiter.finish(self.key, self.request_id, self.credits, spent)


def charge_of(scope: Any) -> Charge | None:
    """The request's metered account, if it has one."""
    charge = scope.get(SCOPE_ACCOUNT)
    return charge if isinstance(charge, Charge) else None


__all__ = ["Charge", "KeyService", "LimiterUnavailable", "charge_of"]
