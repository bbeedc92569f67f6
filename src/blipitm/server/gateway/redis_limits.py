"""The limiter of :mod:`blipitm.server.gateway.limits` with its state in Redis, shared by every
replica.

Each step is one Lua script, so a check and its update are atomic across replicas, and each reads
the clock from Redis (``TIME``) so replicas with skewed clocks still share one window. Per key:

- ``…:req`` / ``…:items``: token buckets (hash of ``tokens``, ``stamp``), expiring when full;
- ``…:slots``: sorted set of in-flight request ids scored by when they expire, so a replica that
  dies mid-request frees its slots after ``slot_ttl_s``;
- ``…:held``: the same for credit reservations (member ``id:credits``);
- ``…:used``: credits spent. It starts from the key store's ``credits_used`` and never falls below
  it;
- ``…:epoch``: a token naming this generation of the key's state. Every script first compares it
  with the token the replica last saw and, if it differs (Redis restarted or was flushed), does
  nothing and says so. The replica then rebuilds the key's state (:data:`_SYNC`): the token, its
  own requests in flight (slots and credit reservations, which it keeps a copy of), and ``used``
  from the store plus its usage not yet written there. So a restart (no persistence needed) loses
  no reservation and overspends nothing; other replicas restore theirs within a second (their
  heartbeat) or at their next request of that key, whichever comes first.

Settling is idempotent (a reservation is billed only when its member is still there to remove)
and survives a failure: a settle that cannot reach Redis is kept and retried every second and
before any other call for that key, so a network cut never leaks slots or reservations until
their TTL. Its billing is in the usage buffer already: a rebuild puts its reservation back and
leaves its credits out of ``used``, and the retried settle then adds them, once.

Usage rows still go to the SQLite store (each replica flushes its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from blipitm.keys import KeyRecord
from blipitm.server.account import LimiterUnavailable
from blipitm.server.gateway.limits import (
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

log = logging.getLogger("blipitm.server")


# First in every per-request script: the last KEYS is the key's epoch, the last ARGV the token the
# replica knows. A mismatch (Redis restarted, or the replica has not seen the key yet): {-1}.
_EPOCH = """
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[#ARGV] then return {-1} end
"""

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
    _EPOCH
    + _CLOCK
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
    _EPOCH
    + _CLOCK
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

# KEYS: slots, held, used. ARGV: id, credits reserved, credits spent (<= reserved).
# Idempotent: the spent credits are added only by the call that removes the reservation.
_FINISH = (
    _EPOCH
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  local spent = tonumber(ARGV[3])
  if redis.call('ZREM', KEYS[2], ARGV[1] .. ':' .. ARGV[2]) == 1 and spent > 0 then
    redis.call('INCRBY', KEYS[3], spent)
  end
end
return {0}
"""
)

# KEYS: epoch, slots, held, used. ARGV: known token, new token, used floor, ttl, number of slot
# ids, the slot ids, then the reservation members. Nothing to do when the token is the known one;
# else (a new Redis, or another replica rebuilt it first) this replica's requests in flight are
# put back and ``used`` raised to the floor. -> {token, 1 if the known token was stale}
_SYNC = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {cur, 0} end
if not cur then cur = ARGV[2]; redis.call('SET', KEYS[1], cur) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = now + tonumber(ARGV[4])
local n = tonumber(ARGV[5])
for i = 6, 5 + n do redis.call('ZADD', KEYS[2], until_, ARGV[i]) end
for i = 6 + n, #ARGV do redis.call('ZADD', KEYS[3], until_, ARGV[i]) end
local floor = tonumber(ARGV[3])
if floor > tonumber(redis.call('GET', KEYS[4]) or '0') then redis.call('SET', KEYS[4], floor) end
return {cur, 1}
"""

# KEYS: req, items, slots, held, used. ARGV: rpm, ipm, window, limit, store_used.
_PEEK = (
    _EPOCH
    + _CLOCK
    + """
local win, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local remaining = -1
if limit >= 0 then remaining = limit - used(KEYS[5], tonumber(ARGV[5])) - held(KEYS[4]) end
return {tostring(bucket(KEYS[1], tonumber(ARGV[1]), win)),
        tostring(bucket(KEYS[2], tonumber(ARGV[2]), win)), redis.call('ZCARD', KEYS[3]), remaining}
"""
)


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Ping Redis once, synchronously, before the server starts: an unreachable ``--redis`` is one
    line and exit status 2, not a traceback from inside the server's start-up."""
    try:
        import redis
    except ImportError:  # pragma: no cover - the [redis] extra is missing
        raise LimiterUnavailable(
            "--redis needs the redis client: pip install 'blipitm[redis]'"
        ) from None
    from redis.exceptions import RedisError

    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    except ValueError as e:
        raise LimiterUnavailable(f"--redis is not a Redis URL: {e}") from None
    try:
        client.ping()
    except (RedisError, OSError) as e:
        # The URL may hold a password: say what failed, not where.
        raise LimiterUnavailable(
            f"cannot reach Redis (--redis): {type(e).__name__}; is it running and reachable "
            "from here?"
        ) from None
    finally:
        client.close()


def _stale(out: Any) -> bool:
    """A script's answer that the key's epoch was not the one the replica sent."""
    return isinstance(out, list) and bool(out) and out[0] == -1


def _limit(value: int | None) -> int:
    return -1 if value is None else value


@dataclass
class _Flight:
    """A request of this replica that Redis holds a slot or a reservation for."""

    key: KeyRecord
    slot: bool = False
    credits: int = 0  # reserved (0: none held)
    spent: int = 0
    settling: bool = False  # finish called: billed in the usage buffer, only Redis left to tell


# What a key has spent for certain, as ``async with floor(key) as spent: spent()``: inside the
# block the count cannot move except by what this process records synchronously (the server holds
# its flush lock there), so ``spent()`` read together with the requests in flight is consistent.
Floor = Callable[[KeyRecord], AbstractAsyncContextManager[Callable[[], int]]]


@contextlib.asynccontextmanager
async def _store_floor(key: KeyRecord) -> AsyncIterator[Callable[[], int]]:
    yield lambda: key.credits_used


class RedisLimiter:
    """The shared limiter. ``slot_ttl_s`` bounds how long a crashed replica's slots and credit
    reservations stay held; it must exceed the longest request. ``floor`` answers what a key has
    spent for certain (the store's balance and the usage not yet written to it): ``used`` is
    rebuilt from it after a Redis restart."""

    def __init__(
        self,
        url: str,
        window_s: float = 60.0,
        slot_ttl_s: float = 300.0,
        floor: Floor = _store_floor,
    ) -> None:
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
        self.floor = floor
        self._redis = aioredis.Redis.from_url(url)
        self._admit = self._redis.register_script(_ADMIT)
        self._reserve = self._redis.register_script(_RESERVE)
        self._finish = self._redis.register_script(_FINISH)
        self._peek = self._redis.register_script(_PEEK)
        self._sync_script = self._redis.register_script(_SYNC)
        self._epochs: dict[str, str] = {}  # key name -> the epoch token last seen
        self._flights: dict[str, _Flight] = {}  # request id -> what Redis holds for it
        self._unsettled: set[str] = set()  # names of keys with a settle that failed
        # Per key: a rebuild and the settles of its requests never interleave, so a rebuild's
        # copy of the requests in flight is never out of date when Redis applies it.
        self._locks: dict[str, asyncio.Lock] = {}

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

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _script(self, key: KeyRecord, script: Any, parts: list[str], args: list[Any]) -> Any:
        """Run a per-request script; when the key's epoch is not the one known (Redis restarted,
        or the key is new to this replica), rebuild the key's state and run it again."""
        await self._retry_settles(key.name)
        keys = self._keys(key, *parts, "epoch")
        for _ in range(2):
            out = await self._call(script, keys=keys, args=[*args, self._epochs.get(key.name, "")])
            if not _stale(out):
                return out
            async with self._lock(key.name):
                await self._sync(key)
            await self._retry_settles(key.name)  # what the rebuild put back for settling requests
        raise LimiterUnavailable("the rate-limit store (Redis) keeps losing its state")

    async def _sync(self, key: KeyRecord) -> None:
        """Make Redis hold this replica's share of ``key``'s state under its current epoch (the
        caller holds the key's lock). Every request in flight here is put back, those settling
        too (they are then settled as usual); ``used`` is raised to what is spent for certain
        minus what those settling requests will add when they settle."""
        async with self.floor(key) as spent_now:
            # From here to the script, no await: the copy and the count are of one moment.
            known = self._epochs.get(key.name, "")
            mine = [(rid, f) for rid, f in self._flights.items() if f.key.name == key.name]
            slots = [rid for rid, f in mine if f.slot]
            holds = [f"{rid}:{f.credits}" for rid, f in mine if f.credits > 0]
            floor = 0
            if key.credit_limit is not None:
                floor = spent_now() - sum(f.spent for _, f in mine if f.settling and f.credits)
            token, stale = await self._call(
                self._sync_script,
                keys=self._keys(key, "epoch", "slots", "held", "used"),
                args=[known, uuid.uuid4().hex, floor, self.slot_ttl_s, len(slots), *slots, *holds],
            )
        self._epochs[key.name] = token.decode() if isinstance(token, bytes) else str(token)
        if any(f.settling for _, f in mine):
            self._unsettled.add(key.name)
        if known and stale:
            log.warning(
                "the rate-limit store (Redis) lost the state of key %r (a restart?): rebuilt "
                "with %d request(s) in flight here",
                key.name,
                len(mine),
            )

    def _window(self, limit: int | None, tokens: float) -> Window | None:
        if limit is None:
            return None
        return Window(limit, math.floor(tokens), (limit - tokens) * self.window_s / limit)

    async def admit(self, key: KeyRecord, request_id: str) -> Verdict:
        status, tokens = await self._script(
            key,
            self._admit,
            ["req", "slots"],
            [_limit(key.rpm), self.window_s, _limit(key.concurrency), request_id, self.slot_ttl_s],
        )
        requests = self._window(key.rpm, float(tokens))
        if status == 1:
            assert key.rpm is not None
            wait = (1 - float(tokens)) * self.window_s / key.rpm
            message = rate_refusal(key, "request", key.rpm, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, requests)
        if status == 2:
            assert key.concurrency is not None
            message = concurrency_refusal(key, key.concurrency)
            return Verdict(RATE_LIMITED, message, CONCURRENCY_RETRY_S, requests)
        self._flights[request_id] = _Flight(key, slot=key.concurrency is not None)
        return Verdict(requests=requests)

    async def reserve(self, key: KeyRecord, request_id: str, items: int, credits: int) -> Verdict:
        status, tokens, remaining = await self._script(
            key,
            self._reserve,
            ["items", "held", "used"],
            [
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
            message = rate_refusal(key, "item", ipm, self.window_s, wait)
            return Verdict(RATE_LIMITED, message, wait, None, window)
        if status == 3:
            return Verdict(NO_CREDITS, no_credits(key, int(remaining), credits), None, None, window)
        if key.credit_limit is not None and credits > 0:
            flight = self._flights.setdefault(request_id, _Flight(key))
            flight.credits = credits
        return Verdict(items=window)

    async def finish(self, key: KeyRecord, request_id: str, credits: int, spent: int) -> None:
        """Settle: the slot back, ``spent`` of the ``credits`` reserved billed. The caller has put
        the billing in the usage buffer first. A failure is kept and retried (see the module)."""
        flight = self._flights.setdefault(request_id, _Flight(key))
        flight.key, flight.credits, flight.spent, flight.settling = key, credits, spent, True
        await self._retry_settles(key.name, first=request_id)

    async def _retry_settles(self, name: str, first: str | None = None) -> None:
        """Settle ``first`` and whatever of key ``name`` failed to settle before."""
        if first is None and name not in self._unsettled:
            return  # the common case: nothing pending, no scan
        self._unsettled.discard(name)
        todo = [(rid, f) for rid, f in self._flights.items() if f.key.name == name and f.settling]
        for rid, f in todo:
            if self._flights.get(rid) is not f:  # settled meanwhile (another coroutine)
                continue
            try:
                await self._settle(rid, f)
            except LimiterUnavailable as e:
                self._unsettled.add(name)
                log.warning(
                    "could not settle a request of key %r (retried every second): %s", name, e
                )
                return

    async def _settle(self, rid: str, f: _Flight) -> None:
        keys = self._keys(f.key, "slots", "held", "used", "epoch")
        async with self._lock(f.key.name):
            if self._flights.get(rid) is not f:
                return  # settled while this waited for the lock
            for _ in range(2):
                epoch = self._epochs.get(f.key.name, "")
                out = await self._call(
                    self._finish, keys=keys, args=[rid, f.credits, f.spent, epoch]
                )
                if not _stale(out):
                    self._flights.pop(rid, None)
                    return
                await self._sync(f.key)  # puts this request's slot and reservation back first
        raise LimiterUnavailable("the rate-limit store (Redis) keeps losing its state")

    async def heartbeat(self) -> None:
        """Every second: retry settles that failed, and put back this replica's requests in
        flight if Redis restarted (so other replicas see them within a second)."""
        by_name = {f.key.name: f.key for f in self._flights.values()}
        for name, key in by_name.items():
            await self._retry_settles(name)
            if name in self._unsettled:
                continue  # Redis cannot be reached
            if not any(f.key.name == name for f in self._flights.values()):
                continue
            (epoch,) = self._keys(key, "epoch")
            token = await self._call(self._redis.get, epoch)
            if token is None or token.decode() != self._epochs.get(name):
                async with self._lock(name):
                    await self._sync(key)
                await self._retry_settles(name)

    async def state(self, key: KeyRecord) -> KeyState:
        req, items, active, remaining = await self._script(
            key,
            self._peek,
            ["req", "items", "slots", "held", "used"],
            [
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


__all__ = ["LimiterUnavailable", "RedisLimiter", "check_reachable"]
