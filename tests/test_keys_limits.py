"""The per-key limiter, in-process and in a real redis-server, held to the same expectations:
token-bucket rate limits, concurrency slots, credit reservations that never overdraw under
concurrency, refunds; and OpenAI's header formats. Expectations are worked out by hand here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blipitm.keys import KeyRecord, KeyStore
from blipitm.server.gateway.limits import (
    NO_CREDITS,
    RATE_LIMITED,
    Bucket,
    Limiter,
    LocalLimiter,
    Verdict,
    duration,
    rate_headers,
    refusal_headers,
)
from redis_helpers import redis_server

WINDOW = 60.0


def key(name: str = "k", **limits: Any) -> KeyRecord:
    return KeyRecord(name=name, hash=b"h" * 32, hint="bk-...x", created=0.0, **limits)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


T = TypeVar("T")
Make = Callable[[], Limiter]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """pytest-asyncio is not a dependency: each test drives its own event loop."""
    return asyncio.run(coro)


@pytest.fixture(params=["local", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    """A factory of fresh limiters (one per event loop), in-process or on a flushed Redis."""

    def factory() -> Limiter:
        if request.param == "local":
            return LocalLimiter(WINDOW)
        from blipitm.server.gateway.redis_limits import RedisLimiter

        return RedisLimiter(request.getfixturevalue("redis_url"), WINDOW, slot_ttl_s=60)

    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        client.flushdb()
        client.close()
    return factory


def test_requests_per_window(make: Make) -> None:
    async def go() -> list[Verdict]:
        lim = make()
        k = key(rpm=3)
        out = [await lim.admit(k, f"r{i}") for i in range(4)]
        await lim.close()
        return out

    verdicts = run(go())
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    refused = verdicts[3]
    assert refused.refusal == RATE_LIMITED and "3 requests per minute" in refused.message
    # One token comes back every 60/3 = 20 s; a little has refilled since the bucket emptied.
    assert refused.retry_after_s is not None and 19.0 < refused.retry_after_s <= 20.0
    assert refused.requests is not None and refused.requests.limit == 3
    assert refused.requests.remaining == 0
    assert verdicts[0].requests is not None and verdicts[0].requests.remaining == 2


def test_concurrency_slots_are_released(make: Make) -> None:
    async def go() -> list[bool]:
        lim = make()
        k = key(concurrency=2)
        a, b, c = [(await lim.admit(k, r)).allowed for r in ("a", "b", "c")]
        await lim.finish(k, "a", 0, spent=0)
        d = (await lim.admit(k, "d")).allowed
        await lim.close()
        return [a, b, c, d]

    assert run(go()) == [True, True, False, True]


def test_credits_reserve_settle_refund(make: Make) -> None:
    async def go() -> tuple[list[Verdict], int | None]:
        lim = make()
        k = key(credit_limit=10)
        out = [await lim.admit(k, "a"), await lim.reserve(k, "a", 4, 4)]
        out.append(await lim.reserve(k, "b", 7, 7))  # 6 left while 4 are held
        await lim.finish(k, "a", 4, spent=0)  # a failed request: refunded
        out.append(await lim.admit(k, "c"))
        out.append(await lim.reserve(k, "c", 10, 10))
        await lim.finish(k, "c", 10, spent=10)
        remaining = (await lim.state(k)).credits_remaining
        out.append(await lim.reserve(k, "d", 1, 1))
        await lim.close()
        return out, remaining

    verdicts, remaining = run(go())
    assert [v.allowed for v in verdicts] == [True, True, False, True, True, False]
    assert verdicts[2].refusal == NO_CREDITS and "6 credits left" in verdicts[2].message
    assert verdicts[2].retry_after_s is None  # retrying cannot help: x-should-retry: false
    assert remaining == 0


def test_parallel_reservations_never_overdraw(make: Make) -> None:
    async def go() -> tuple[int, int | None]:
        lim = make()
        k = key(credit_limit=10)
        verdicts = await asyncio.gather(*(lim.reserve(k, f"r{i}", 1, 1) for i in range(50)))
        ok = [i for i, v in enumerate(verdicts) if v.allowed]
        for i in ok:
            await lim.finish(k, f"r{i}", 1, spent=1)
        remaining = (await lim.state(k)).credits_remaining
        await lim.close()
        return len(ok), remaining

    assert run(go()) == (10, 0)


def test_store_balance_is_a_floor(make: Make) -> None:
    """Credits spent per the store (another replica, a previous run) count even if this
    limiter never saw them."""

    async def go() -> list[bool]:
        lim = make()
        k = key(credit_limit=10, credits_used=8)
        out = [(await lim.reserve(k, "a", 3, 3)).allowed, (await lim.reserve(k, "b", 2, 2)).allowed]
        await lim.close()
        return out

    assert run(go()) == [False, True]


def test_items_per_window(make: Make) -> None:
    async def go() -> list[Verdict]:
        lim = make()
        k = key(items_per_minute=5)
        out = [await lim.reserve(k, "a", 6, 0), await lim.reserve(k, "b", 3, 0)]
        out.append(await lim.reserve(k, "c", 3, 0))
        await lim.close()
        return out

    too_big, ok, over = run(go())
    assert too_big.refusal == RATE_LIMITED and too_big.retry_after_s is None
    assert "send fewer items" in too_big.message
    assert ok.allowed and ok.items is not None and ok.items.remaining == 2
    # 1 item missing, refilled at 5 per 60 s: 12 s.
    assert over.refusal == RATE_LIMITED and over.retry_after_s is not None
    assert 11.0 < over.retry_after_s <= 12.0


def test_bucket_refill_by_hand() -> None:
    b = Bucket(6, 60.0, stamp=100.0)  # 0.1 token per second
    b.tokens = 0.0
    b.refill(6, 115.0)
    assert b.tokens == pytest.approx(1.5, abs=1e-12)
    assert b.wait_s(2) == pytest.approx(5.0, abs=1e-9)
    assert b.window().remaining == 1 and b.window().reset_s == pytest.approx(45.0, abs=1e-9)
    b.refill(6, 10_000.0)
    assert b.tokens == 6.0  # never above the limit
    b.refill(2, 10_000.0)  # the key's limit was lowered
    assert b.tokens == 2.0


def test_header_formats() -> None:
    assert [duration(s) for s in (0.0, 0.0201, 1.5, 59.9991, 360.0)] == [
        "0ms", "21ms", "1.5s", "1m0s", "6m0s",
    ]  # fmt: skip
    v = Verdict(RATE_LIMITED, "x", 1.2)
    assert refusal_headers(v) == {"Retry-After": "2", "retry-after-ms": "1200"}
    assert refusal_headers(Verdict(NO_CREDITS, "x", None)) == {"x-should-retry": "false"}
    from blipitm.server.gateway.limits import Window

    h = rate_headers(Window(60, 59, 1.0), None)
    assert h == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
    }


def test_a_client_that_left_is_refunded_and_metered(tmp_path: Path) -> None:
    """The guard settles a request whose client went away with status 499: refunded, recorded."""
    from prometheus_client import CollectorRegistry

    from blipitm.server.gateway.accounts import KeyService
    from blipitm.server.settings import ServerSettings

    KeyStore(tmp_path / "k.db").create("k", credits=5)
    service = KeyService(ServerSettings(keys_db=str(tmp_path / "k.db")), CollectorRegistry())

    async def go() -> int | None:
        await service.reload()
        record = service.current("k")
        assert record is not None
        for status in (499, 200):
            charge = service.open(record, "/v1/embeddings")
            assert (await charge.admit()).allowed
            await charge.reserve(texts=2, images=0)
            await charge.finish(status)
        await service.buffer.flush()
        return (await service.limiter.state(record)).credits_remaining

    assert run(go()) == 3
    rows = {r.status: r for r in service.store.usage("k")}
    assert (rows[499].requests, rows[499].credits, rows[499].tokens) == (1, 0, 0)
    assert rows[200].credits == 2 and service.store.get("k").credits_remaining == 3


def test_metric_labels_are_bounded() -> None:
    from prometheus_client import CollectorRegistry

    from blipitm.server.gateway.metering import KeyMetrics

    metrics = KeyMetrics(CollectorRegistry(), max_names=2)
    assert [metrics.label(n) for n in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        "_other",
        "a",
        "_other",
    ]


def test_a_key_named_other_is_not_the_overflow() -> None:
    """Issue 18 item 8: the overflow label was "other", which is also a valid key name."""
    from prometheus_client import CollectorRegistry

    from blipitm.keys import validate_name
    from blipitm.server.gateway.metering import OTHER, KeyMetrics

    metrics = KeyMetrics(CollectorRegistry(), max_names=1)
    assert metrics.label("other") == "other" and metrics.label("late") == OTHER != "other"
    with pytest.raises(Exception, match="a key name is"):
        validate_name(OTHER)  # no key can ever be called the overflow label


def test_messages_count_correctly() -> None:
    k = key()
    from blipitm.server.gateway.limits import (
        concurrency_refusal,
        no_credits,
        rate_refusal,
        too_many_items,
    )

    assert "1 request per minute" in rate_refusal(k, "request", 1, 60.0, 1.0)
    assert "2 items per minute" in rate_refusal(k, "item", 2, 60.0, 1.0)
    assert "has 1 credit left" in no_credits(k, 1, 2)
    assert "already has 1 request in progress" in concurrency_refusal(k, 1)
    assert "this request has 1 item," in too_many_items(k, 1, 0, 60.0)


def service_with(tmp_path: Path, **limits: Any) -> Any:
    from prometheus_client import CollectorRegistry

    from blipitm.server.gateway.accounts import KeyService
    from blipitm.server.settings import ServerSettings

    KeyStore(tmp_path / "k.db").create("k", **limits)
    return KeyService(ServerSettings(keys_db=str(tmp_path / "k.db")), CollectorRegistry())


def test_setting_the_balance_ignores_spending_not_yet_written(tmp_path: Path) -> None:
    """`keys update --credits 10` right after spending 6 that the server had not written yet:
    the balance is 10, not 10 - 6 (issue 18 item 8)."""
    from blipitm.cli.main import main

    service = service_with(tmp_path, credits=20)

    async def spend(texts: int) -> None:
        record = service.current("k")
        charge = service.open(record, "/v1/embeddings")
        assert (await charge.admit()).allowed
        await charge.reserve(texts=texts, images=0)
        await charge.finish(200)

    async def go() -> tuple[int | None, int | None]:
        await service.reload()
        await spend(6)  # billed in memory, not yet in the store
        assert (
            main(["keys", "update", "k", "--keys-db", str(service.store.path), "--credits", "10"])
            == 0
        )
        await service.buffer.flush()  # the server's next flush
        after_set = service.store.get("k").credits_remaining
        await service.reload()
        await spend(3)  # billed after the server saw the new balance: it counts
        await service.buffer.flush()
        return after_set, service.store.get("k").credits_remaining

    assert run(go()) == (10, 7)
    assert service.store.get("k").credits_used == 9  # the spending itself is all kept


def test_reload_reads_only_the_keys_that_changed(tmp_path: Path) -> None:
    service = service_with(tmp_path, rpm=5)
    for name in ("a", "b"):
        service.store.create(name)

    async def go() -> list[int]:
        counts = [await service.reload(), await service.reload()]
        service.store.update("b", rpm=7)
        service.store.add_usage([])  # nothing to write: no change
        counts.append(await service.reload())
        return counts

    assert run(go()) == [3, 0, 1]
    assert service.current("b").rpm == 7 and service.current("k").rpm == 5


def test_usage_has_its_own_capped_slots(tmp_path: Path) -> None:
    """GET /v1/usage takes no model slot (a key at its limit can still ask) but is capped at the
    key's --concurrency too: it was unbounded (issue 18 item 8)."""
    from starlette.routing import Route

    from blipitm.server.gateway.auth import Authenticator, KeyChecker
    from blipitm.server.gateway.middleware import GatewayMiddleware

    service = service_with(tmp_path, concurrency=1)
    secret = service.store.create("c", concurrency=1)
    held = asyncio.Event()
    statuses: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await held.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = GatewayMiddleware(
        app,
        keys=Authenticator(KeyChecker(()), service),
        protect_metrics=False,
        routes=[Route("/v1/usage", lambda r: None)],
    )

    async def call() -> None:
        scope = {"type": "http", "method": "GET", "path": "/v1/usage",
                 "headers": [(b"authorization", f"Bearer {secret}".encode())]}  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await guard(scope, receive, send)

    async def go() -> None:
        await service.reload()
        first = asyncio.create_task(call())
        await asyncio.sleep(0)  # the first is now inside the app, holding the slot
        # A second at once: over --concurrency 1 (the bound only stops a hang if it is let in).
        await asyncio.wait_for(call(), timeout=60)
        held.set()
        await first
        await call()  # the slot is back

    run(go())
    assert statuses == [429, 200, 200]


def test_usage_read_during_a_flush_counts_every_row_once(tmp_path: Path) -> None:
    """A flush takes the buffered rows, then writes them in a thread: a ``/v1/usage`` read of
    the store before that write lands and of the (now empty) buffer after it saw 1 request of 4."""
    import threading

    from blipitm.server.gateway.metering import UsageBuffer, usage_row

    class SlowStore(KeyStore):
        writing = threading.Event()
        proceed = threading.Event()

        def add_usage(self, *args: Any, **kwargs: Any) -> Any:
            self.writing.set()
            assert self.proceed.wait(30)
            return super().add_usage(*args, **kwargs)

    store = SlowStore(tmp_path / "keys.db", create=True)
    store.create("k")
    buffer = UsageBuffer(store)
    for _ in range(3):
        buffer.add(usage_row("k", "/v1/embeddings", 200, texts=1, images=0, tokens=5,
                             credits=1, started=0.0))  # fmt: skip

    async def main() -> int:
        flush = asyncio.create_task(buffer.flush())
        await asyncio.to_thread(store.writing.wait, 30)
        read = asyncio.create_task(buffer.usage("k"))
        await asyncio.sleep(0.2)  # the read is waiting for the flush, not racing it
        store.proceed.set()
        await flush
        return sum(row.requests for row in await read)

    assert asyncio.run(main()) == 3
