"""Per-key limits: requests and items per window (token buckets), concurrent requests, credits.

A request meets the limiter three times: ``admit`` (one request token and a concurrency slot,
before the body is read), ``reserve`` (its items and credits, from what the body declares, before
any work), ``finish`` (the slot back; the credits of the work done billed, the rest refunded).
Finishing is idempotent: a request id settles once, a repeated call does nothing. This module
keeps that state in the process (one replica); :mod:`blipitm.server.gateway.redis_limits` keeps
the same state in Redis for several replicas. Both answer with a :class:`Verdict`.

Rate limits are token buckets of ``limit`` tokens refilled evenly over the window (60 s): a key may
burst its whole limit, then gets one more request every ``window / limit`` seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from blipitm.keys import KeyRecord

RATE_LIMITED = "rate_limit_exceeded"
NO_CREDITS = "insufficient_quota"


@dataclass(frozen=True)
class Window:
    """One rate limit as the ``x-ratelimit-*`` headers show it."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True)
class Verdict:
    refusal: str | None = None  # None: allowed; else RATE_LIMITED or NO_CREDITS
    message: str = ""
    retry_after_s: float | None = None  # None with a refusal: retrying cannot help
    requests: Window | None = None
    items: Window | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class KeyState:
    """What ``GET /v1/usage`` reports as remaining."""

    requests: Window | None
    items: Window | None
    credits_remaining: int | None
    active: int


class Limiter(Protocol):
    async def admit(self, key: KeyRecord, request_id: str) -> Verdict: ...
    async def reserve(
        self, key: KeyRecord, request_id: str, items: int, credits: int
    ) -> Verdict: ...
    async def finish(self, key: KeyRecord, request_id: str, credits: int, spent: int) -> None: ...
    async def state(self, key: KeyRecord) -> KeyState: ...
    async def heartbeat(self) -> None: ...
    async def close(self) -> None: ...


def plural(n: int, word: str) -> str:
    """``1 credit``, ``2 credits``: messages count correctly."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def per_window(window_s: float) -> str:
    return "minute" if window_s == 60 else f"{window_s:g} s"


def rate_refusal(key: KeyRecord, what: str, limit: int, window_s: float, wait_s: float) -> str:
    """``what``: the singular, ``request`` or ``item``."""
    return (
        f"key {key.name!r} is over its limit of {plural(limit, what)} per {per_window(window_s)}; "
        f"retry in {wait_s:.2f} s"
    )


def too_many_items(key: KeyRecord, items: int, limit: int, window_s: float) -> str:
    return (
        f"this request has {plural(items, 'item')}, more than key {key.name!r} may send per "
        f"{per_window(window_s)} ({limit}); send fewer items per request"
    )


def no_credits(key: KeyRecord, remaining: int, needed: int) -> str:
    return (
        f"key {key.name!r} has {plural(max(remaining, 0), 'credit')} left and this request needs "
        f"{needed}; "
        "ask the operator for more (`blipitm keys update NAME --add-credits N`)"
    )


def concurrency_refusal(key: KeyRecord, limit: int) -> str:
    return (
        f"key {key.name!r} already has {plural(limit, 'request')} in progress, its limit; "
        "retry when one finishes"
    )


# Retry-After of a refusal for concurrency: there is no clock to read, a slot frees when a request
# ends, so the client is told to come back shortly.
CONCURRENCY_RETRY_S = 1.0


@dataclass
class Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity / window_s`` per second."""

    capacity: int
    window_s: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.capacity)

    @property
    def rate(self) -> float:
        return self.capacity / self.window_s

    def refill(self, capacity: int, now: float) -> None:
        # A new capacity (the CLI changed the key) applies at once, never above the new limit.
        self.tokens = min(float(capacity), self.tokens + (now - self.stamp) * self.rate)
        self.capacity, self.stamp = capacity, now

    def wait_s(self, n: int) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        return max(0.0, (n - self.tokens) / self.rate)

    def window(self) -> Window:
        full_in = (self.capacity - self.tokens) / self.rate
        return Window(self.capacity, math.floor(self.tokens), full_in)


@dataclass
class _Local:
    requests: Bucket | None = None
    items: Bucket | None = None
    active: int = 0
    used: int = 0  # credits spent as this process knows it (>= the store's, which lags a flush)
    reserved: int = 0


@dataclass
class _Flight:
    name: str
    slot: bool = False
    credits: int = 0


class LocalLimiter:
    """The limiter for one replica: plain in-process state on the event loop (no locks needed:
    every method runs to completion without awaiting)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._keys: dict[str, _Local] = {}
        self._flights: dict[str, _Flight] = {}  # request id -> what it holds, until settled

    def _state(self, key: KeyRecord, now: float) -> _Local:
        st = self._keys.setdefault(key.name, _Local())
        st.requests = self._bucket(st.requests, key.rpm, now)
        st.items = self._bucket(st.items, key.items_per_minute, now)
        st.used = max(st.used, key.credits_used)
        return st

    def _bucket(self, bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
        if limit is None:
            return None
        if bucket is None:
            return Bucket(limit, self.window_s, stamp=now)
        bucket.refill(limit, now)
        return bucket

    async def admit(self, key: KeyRecord, request_id: str) -> Verdict:
        st = self._state(key, time.monotonic())
        rq = st.requests
        if rq is not None and rq.tokens < 1:
            wait = rq.wait_s(1)
            message = rate_refusal(key, "request", rq.capacity, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, rq.window(), _window(st.items))
        if key.concurrency is not None and st.active >= key.concurrency:
            message = concurrency_refusal(key, key.concurrency)
            return Verdict(
                RATE_LIMITED, message, CONCURRENCY_RETRY_S, _window(rq), _window(st.items)
            )
        if rq is not None:
            rq.tokens -= 1
        st.active += 1
        self._flights[request_id] = _Flight(key.name, slot=True)
        return Verdict(requests=_window(rq), items=_window(st.items))

    async def reserve(self, key: KeyRecord, request_id: str, items: int, credits: int) -> Verdict:
        st = self._state(key, time.monotonic())
        it = st.items
        if it is not None and items > it.capacity:
            message = too_many_items(key, items, it.capacity, self.window_s)
            return Verdict(RATE_LIMITED, message, None, _window(st.requests), it.window())
        if it is not None and it.tokens < items:
            wait = it.wait_s(items)
            message = rate_refusal(key, "item", it.capacity, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, _window(st.requests), it.window())
        if key.credit_limit is not None:
            remaining = key.credit_limit - st.used - st.reserved
            if credits > remaining:
                message = no_credits(key, remaining, credits)
                return Verdict(NO_CREDITS, message, None, _window(st.requests), _window(it))
        if it is not None:
            it.tokens -= items
        st.reserved += credits
        self._flights.setdefault(request_id, _Flight(key.name)).credits += credits
        return Verdict(requests=_window(st.requests), items=_window(it))

    async def finish(self, key: KeyRecord, request_id: str, credits: int, spent: int) -> None:
        flight = self._flights.pop(request_id, None)
        if flight is None:  # settled already (or never admitted): nothing is held
            return
        st = self._keys[key.name]
        st.active -= flight.slot
        st.reserved -= flight.credits
        st.used += min(spent, flight.credits)

    async def heartbeat(self) -> None:
        return None

    async def state(self, key: KeyRecord) -> KeyState:
        st = self._state(key, time.monotonic())
        remaining = None
        if key.credit_limit is not None:
            remaining = key.credit_limit - st.used - st.reserved
        return KeyState(_window(st.requests), _window(st.items), remaining, st.active)

    async def close(self) -> None:
        return None


def _window(bucket: Bucket | None) -> Window | None:
    return None if bucket is None else bucket.window()


# -- OpenAI's headers -----------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = math.ceil(max(seconds, 0.0) * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:g}s"
    return f"{minutes}m{secs}" if minutes else secs


def rate_headers(requests: Window | None, items: Window | None) -> dict[str, str]:
    """``x-ratelimit-*`` for the limits a key has; items stand in for OpenAI's tokens."""
    out: dict[str, str] = {}
    for suffix, w in (("requests", requests), ("tokens", items)):
        if w is not None:
            out[f"x-ratelimit-limit-{suffix}"] = str(w.limit)
            out[f"x-ratelimit-remaining-{suffix}"] = str(max(w.remaining, 0))
            out[f"x-ratelimit-reset-{suffix}"] = duration(w.reset_s)
    return out


def refusal_headers(verdict: Verdict) -> dict[str, str]:
    """What a 429 adds: when to retry, or (``x-should-retry: false``) that retrying cannot help."""
    if verdict.retry_after_s is None:
        return {"x-should-retry": "false"}
    wait = verdict.retry_after_s
    return {
        "Retry-After": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
