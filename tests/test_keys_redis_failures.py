"""Per-key credits through a real redis-server that restarts mid-flight or whose network is cut
while requests settle (issue 18 item 5): the balance stays exact, no key is overspent, and none is
locked out by slots or reservations that a failure it did not cause left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from blipitm.keys import KeyStore
from blipitm.server.errors import APIError
from blipitm.server.gateway.accounts import Charge, KeyService
from blipitm.server.gateway.middleware import settle as _settle
from blipitm.server.settings import ServerSettings
from redis_helpers import RedisProcess, redis_server
from server_helpers import free_port


def service_for(db: Path, url: str) -> KeyService:
    return KeyService(ServerSettings(keys_db=str(db), redis_url=url), CollectorRegistry())


async def open_request(service: KeyService, name: str, texts: int) -> tuple[Charge, bool]:
    """A request admitted and its credits reserved; False when the reservation was refused."""
    record = service.current(name)
    assert record is not None
    charge = service.open(record, "/v1/embeddings")
    assert (await charge.admit()).allowed
    try:
        await charge.reserve(texts=texts, images=0)
    except APIError as e:
        assert e.status == 429 and e.code == "insufficient_quota", e
        return charge, False
    return charge, True


def test_redis_restart_mid_flight_keeps_the_balance_exact(tmp_path: Path) -> None:
    """40 credits reserved by 4 requests in flight, then Redis restarts: 4 more requests must
    not find the 40 free again, and the 4 first are billed once. Before the fix: billed 80."""
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    store.create("k", credits=40)
    with RedisProcess(free_port()) as redis_proc:
        service = service_for(db, redis_proc.url)

        async def go() -> tuple[list[bool], int | None]:
            await service.reload()
            first = [await open_request(service, "k", 10) for _ in range(4)]
            assert all(ok for _, ok in first)
            redis_proc.restart()
            later = []
            for _ in range(4):
                with contextlib.suppress(Exception):  # the first call meets the dropped link
                    await service.limiter.ping()  # type: ignore[attr-defined]
                later.append(await open_request(service, "k", 10))
            for charge, _ in first:
                await _settle(charge, 200)
            for charge, ok in later:
                await _settle(charge, 200 if ok else 429)
            await service.buffer.flush()
            await service.reload()
            record = service.current("k")
            assert record is not None
            remaining = (await service.limiter.state(record)).credits_remaining
            await service.limiter.close()
            return [ok for _, ok in later], remaining

        later_ok, remaining = asyncio.run(go())
    record = store.get("k")
    assert (record.credits_used, record.credits_remaining, remaining) == (40, 0, 0)
    assert later_ok == [False] * 4  # the 40 credits were still reserved across the restart
    assert sum(r.credits for r in store.usage("k")) == 40


class CuttableProxy:
    """A TCP proxy to Redis on the test's event loop whose link the test cuts and restores."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def sever(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CuttableProxy]:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        try:
            yield self
        finally:
            self.sever()
            server.close()


def test_a_network_cut_while_settling_leaks_nothing(tmp_path: Path) -> None:
    """Two requests of a key with --concurrency 2 settle while the link to Redis is cut. Once it
    is back, the key has both slots and exactly its balance: before the fix, both slots and the
    20 reserved credits stayed held until their TTL (429, and a balance counted twice)."""
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    store.create("k", credits=40, concurrency=2)
    with redis_server() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])

        async def go() -> tuple[bool, list[bool], int | None]:
            proxy = CuttableProxy(port)
            async with proxy.running():
                service = service_for(db, proxy.url)
                await service.reload()
                flights = [await open_request(service, "k", 10) for _ in range(2)]
                proxy.sever()
                for charge, _ in flights:
                    await _settle(charge, 200)  # cannot reach Redis: must not be lost
                proxy.cut = False
                # No wait for the server's once-a-second retry: the next call for the key settles
                # what is pending before anything else.
                await service.buffer.flush()
                await service.reload()
                record = service.current("k")
                assert record is not None
                remaining = (await service.limiter.state(record)).credits_remaining
                charge = service.open(record, "/v1/embeddings")
                admitted = (await charge.admit()).allowed
                await charge.reserve(texts=20, images=0)  # exactly what is left
                spend = [await open_request(service, "k", 1)]
                await service.limiter.close()
            return admitted, [ok for _, ok in spend], remaining

        admitted, spend, remaining = asyncio.run(go())
    assert (remaining, admitted) == (20, True)  # 40 - 2 x 10, and the slots are free again
    # The third request holds one slot and the 20 left: a fourth is admitted, and refused credits.
    assert spend == [False]
    assert store.get("k").credits_used == 20


@pytest.mark.parametrize("status", [200, 500])
def test_settling_twice_bills_once(tmp_path: Path, status: int) -> None:
    db = tmp_path / "keys.db"
    KeyStore(db).create("k", credits=10)
    with redis_server() as url:
        service = service_for(db, url)

        async def go() -> int | None:
            await service.reload()
            charge, ok = await open_request(service, "k", 4)
            assert ok
            record = service.current("k")
            assert record is not None
            await charge.finish(status)
            await service.limiter.finish(record, charge.request_id, 4, 4)  # a retried settle
            remaining = (await service.limiter.state(record)).credits_remaining
            await service.limiter.close()
            return remaining

        assert asyncio.run(go()) == (6 if status == 200 else 10)


def test_settles_cut_off_then_a_restart_bill_once(tmp_path: Path) -> None:
    """Both failures at once: two settles cannot reach Redis, then Redis restarts before the link
    comes back. The retried settles bill each request once: 20 spent of 40, 20 left."""
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    store.create("k", credits=40, concurrency=2)
    with RedisProcess(free_port()) as redis_proc:

        async def go() -> tuple[int | None, list[bool]]:
            proxy = CuttableProxy(redis_proc.port)
            async with proxy.running():
                service = service_for(db, proxy.url)
                await service.reload()
                flights = [await open_request(service, "k", 10) for _ in range(2)]
                proxy.sever()
                for charge, _ in flights:
                    await _settle(charge, 200)
                redis_proc.restart()  # everything Redis held is gone
                proxy.cut = False
                await service.buffer.flush()
                await service.reload()
                record = service.current("k")
                assert record is not None
                remaining = (await service.limiter.state(record)).credits_remaining
                spend = [await open_request(service, "k", n) for n in (20, 1)]
                await service.limiter.close()
            return remaining, [ok for _, ok in spend]

        remaining, spend = asyncio.run(go())
    assert (remaining, spend) == (20, [True, False])
    assert store.get("k").credits_used == 20
