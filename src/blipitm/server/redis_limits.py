"""The limiter of :mod:`blipitm.server.limits` with its state in Redis, shared by every replica.

Each step is one Lua script, so a check and its update are atomic across replicas, and each reads
the clock from Redis (``TIME``) so replicas with skewed clocks still share one window. Per key:

- ``…:req`` / ``…:items``: token buckets (hash of ``tokens``, ``stamp``), expiring when full;
- ``…:slots``: sorted set of in-flight request ids scored by when they expire, so a replica that
  dies mid-request frees its slots after ``slot_ttl_s``;
- ``…:held``: the same for credit reservations (member ``id:credits``);
- ``…:used``: credits spent. It starts from the key store's ``credits_used`` and never falls below
  it, so a Redis restart (no persistence needed) loses at most what was not yet flushed (~1 s).

Usage rows still go to the SQLite store (each replica flushes its own).
"""

from __future__ import annotations

import math
from typing import Any

from blipitm.errors import BlipitmError
from blipitm.keys import KeyRecord
from blipitm.server.limits import (
    CONCURRENCY_RETRY_S,
    NO_CREDITS,
    RATE_LIMITED,
    KeyState,
    Verdict,
    Window,
    concurrency_refusal,
    no_credits,
    rate_refusal,
    too_many_items,
)


class LimiterUnavailable(BlipitmError):
    """Redis cannot be reached: requests of metered keys are refused (503), never let through."""


# Shared by the scripts: refill the bucket at KEYS[b] (capacity ARGV cap, window ARGV win).
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function bucket(key, cap, win)
  if cap < 0 then return -1 end
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens, stamp = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then return cap end
  return math.min(cap, tokens + math.max(0, now - stamp) * cap / win)
end
local function save(key, cap, win, tokens)
  if cap < 0 then return end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(win * 1000) + 1000)
end
local function held(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local sum = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    sum = sum + tonumber(string.match(m, ':(%d+)$'))
  end
  return sum
end
local function used(key, floor)
  local u = tonumber(redis.call('GET', key) or '0')
  if floor > u then redis.call('SET', key, floor); u = floor end
  return u
end
"""

# KEYS: req, slots. ARGV: rpm, window, concurrency, id, ttl. -> status (0 ok, 1 rpm, 2 slots)
_ADMIT = (
    _CLOCK
    + """
local rpm, win, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = bucket(KEYS[1], rpm, win)
local active = 0
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  active = redis.call('ZCARD', KEYS[2])
end
local status = 0
if rpm >= 0 and tokens < 1 then status = 1 elseif conc >= 0 and active >= conc then status = 2 end
if status == 0 then
  if rpm >= 0 then tokens = tokens - 1 end
  if conc >= 0 then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4]) end
end
save(KEYS[1], rpm, win, tokens)
return {status, tostring(tokens)}
"""
)

# KEYS: items, held, used. ARGV: ipm, window, items, limit, credits, store_used, id, ttl.
# -> status (0 ok, 1 never fits, 2 items, 3 credits), items tokens, credits remaining
_RESERVE = (
    _CLOCK
    + """
local ipm, win, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, credits = tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens = bucket(KEYS[1], ipm, win)
local status, remaining = 0, -1
if ipm >= 0 and n > ipm then status = 1 elseif ipm >= 0 and tokens < n then status = 2 end
if status == 0 and limit >= 0 then
  remaining = limit - used(KEYS[3], tonumber(ARGV[6])) - held(KEYS[2])
  if credits > remaining then status = 3 end
end
if status == 0 then
  if ipm >= 0 then tokens = tokens - n end
  if limit >= 0 and credits > 0 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[8]), ARGV[7] .. ':' .. credits)
  end
end
save(KEYS[1], ipm, win, tokens)
return {status, tostring(tokens), remaining}
"""
)

# KEYS: slots, held, used. ARGV: id, credits, billed (1/0).
_FINISH = """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  if redis.call('ZREM', KEYS[2], ARGV[1] .. ':' .. ARGV[2]) == 1 and ARGV[3] == '1' then
    redis.call('INCRBY', KEYS[3], ARGV[2])
  end
end
return 0
"""

# KEYS: req, items, slots, held, used. ARGV: rpm, ipm, window, limit, store_used.
_PEEK = (
    _CLOCK
    + """
local win, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local remaining = -1
if limit >= 0 then remaining = limit - used(KEYS[5], tonumber(ARGV[5])) - held(KEYS[4]) end
return {tostring(bucket(KEYS[1], tonumber(ARGV[1]), win)),
        tostring(bucket(KEYS[2], tonumber(ARGV[2]), win)), redis.call('ZCARD', KEYS[3]), remaining}
"""
)


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisLimiter:
    """The shared limiter. ``slot_ttl_s`` bounds how long a crashed replica's slots and credit
    reservations stay held; it must exceed the longest request."""

    def __init__(self, url: str, window_s: float = 60.0, slot_ttl_s: float = 300.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:  # pragma: no cover - the [redis] extra is missing
            raise LimiterUnavailable(
                "--redis needs the redis client: pip install 'blipitm[redis]'"
            ) from None
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.window_s = window_s
        self.slot_ttl_s = slot_ttl_s
        self._redis = aioredis.Redis.from_url(url)
        self._admit = self._redis.register_script(_ADMIT)
        self._reserve = self._redis.register_script(_RESERVE)
        self._finish = self._redis.register_script(_FINISH)
        self._peek = self._redis.register_script(_PEEK)

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except self._errors as e:
            # The URL may hold a password: say what failed, not where.
            raise LimiterUnavailable(
                f"the rate-limit store (Redis) failed: {type(e).__name__}"
            ) from None

    @staticmethod
    def _keys(key: KeyRecord, *parts: str) -> list[str]:
        return [f"blipitm:key:{{{key.name}}}:{p}" for p in parts]

    def _window(self, limit: int | None, tokens: float) -> Window | None:
        if limit is None:
            return None
        return Window(limit, math.floor(tokens), (limit - tokens) * self.window_s / limit)

    async def admit(self, key: KeyRecord, request_id: str) -> Verdict:
        status, tokens = await self._call(
            self._admit,
            keys=self._keys(key, "req", "slots"),
            args=[
                _limit(key.rpm),
                self.window_s,
                _limit(key.concurrency),
                request_id,
                self.slot_ttl_s,
            ],
        )
        requests = self._window(key.rpm, float(tokens))
        if status == 1:
            assert key.rpm is not None
            wait = (1 - float(tokens)) * self.window_s / key.rpm
            message = rate_refusal(key, "requests", key.rpm, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, requests)
        if status == 2:
            assert key.concurrency is not None
            message = concurrency_refusal(key, key.concurrency)
            return Verdict(RATE_LIMITED, message, CONCURRENCY_RETRY_S, requests)
        return Verdict(requests=requests)

    async def reserve(self, key: KeyRecord, request_id: str, items: int, credits: int) -> Verdict:
        status, tokens, remaining = await self._call(
            self._reserve,
            keys=self._keys(key, "items", "held", "used"),
            args=[
                *(_limit(key.items_per_minute), self.window_s, items),
                *(_limit(key.credit_limit), credits, key.credits_used),
                *(request_id, self.slot_ttl_s),
            ],
        )
        window = self._window(key.items_per_minute, float(tokens))
        ipm = key.items_per_minute
        if status == 1:
            assert ipm is not None
            return Verdict(
                RATE_LIMITED, too_many_items(key, items, ipm, self.window_s), None, None, window
            )
        if status == 2:
            assert ipm is not None
            wait = (items - float(tokens)) * self.window_s / ipm
            message = rate_refusal(key, "items", ipm, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, None, window)
        if status == 3:
            return Verdict(NO_CREDITS, no_credits(key, int(remaining), credits), None, None, window)
        return Verdict(items=window)

    async def finish(self, key: KeyRecord, request_id: str, credits: int, billed: bool) -> None:
        await self._call(
            self._finish,
            keys=self._keys(key, "slots", "held", "used"),
            args=[request_id, credits, int(billed)],
        )

    async def state(self, key: KeyRecord) -> KeyState:
        req, items, active, remaining = await self._call(
            self._peek,
            keys=self._keys(key, "req", "items", "slots", "held", "used"),
            args=[
                *(_limit(key.rpm), _limit(key.items_per_minute), self.window_s),
                *(_limit(key.credit_limit), key.credits_used),
            ],
        )
        return KeyState(
            self._window(key.rpm, float(req)),
            self._window(key.items_per_minute, float(items)),
            None if key.credit_limit is None else int(remaining),
            int(active),
        )

    async def close(self) -> None:
        await self._redis.aclose()
