"""What per-key API keys cost a request: key check, limits and metering, in one run.

    flock /work/notes/bench.lock python bench/keys_bench.py [--requests 400] [--rounds 3]

Three ``blipitm serve`` processes on the same tiny random checkpoint, up at once:
``operator`` (a static ``--api-key``: the baseline), ``keys-db`` (a store key with every limit set,
so admission, reservation, settlement and metering all run; in-process limiter) and ``redis``
(the same with ``--redis`` on a local redis-server). A tiny model keeps the model's own time small,
so the overhead is as visible as it gets. Each round measures every server in turn (sequential
requests: median latency; ``--concurrency`` clients: throughput), and rounds alternate to spread
load drift evenly; the table reports medians over rounds. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from blipitm.keys import KeyStore  # noqa: E402
from blipitm.testing.make_checkpoint import make_checkpoint  # noqa: E402
from redis_helpers import redis_server  # noqa: E402
from server_helpers import ServerProcess, free_port  # noqa: E402

OPERATOR = "bench-operator-key"
BODY = {"input": ["a dog running on the grass"]}


def start(ckpt: Path, *flags: str) -> ServerProcess:
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(ckpt), "--host", "127.0.0.1"]
    server = ServerProcess(
        [*argv, "--port", str(port), "--log-level", "warning", "--max-wait-ms", "0", *flags], port
    )
    server.wait_ready()
    return server


def latency_ms(url: str, key: str, n: int) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    times = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for _ in range(10):  # warm the connection and the server's caches
            client.post("/v1/embeddings", json=BODY).raise_for_status()
        for _ in range(n):
            t = time.perf_counter()
            client.post("/v1/embeddings", json=BODY).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def _throughput(url: str, key: str, n: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                (await c.post("/v1/embeddings", json=BODY)).raise_for_status()

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t)


def in_process_us(db: Path, n: int = 20_000) -> float:
    """CPU time of the per-request key path alone (auth, admit, reserve, headers, settle,
    metering), in-process limiter, no HTTP: what a metered request adds to the server's work."""
    from blipitm.server.auth import Authenticator, KeyChecker
    from blipitm.server.keys import KeyService
    from prometheus_client import CollectorRegistry

    from blipitm.server.settings import ServerSettings

    service = KeyService(ServerSettings(keys_db=str(db)), CollectorRegistry())
    (secret,) = _SECRETS
    auth = Authenticator(KeyChecker([OPERATOR]), service)

    async def run() -> float:
        await service.reload()
        t = time.perf_counter()
        for _ in range(n):
            key = auth.authenticate(f"Bearer {secret}")
            assert not isinstance(key, str) and key is not None
            charge = service.open(key, "/v1/embeddings")
            await charge.admit()
            await charge.reserve(1, 0)
            _ = charge.headers
            await charge.finish(200)
        return (time.perf_counter() - t) / n * 1e6

    return asyncio.run(run())


_SECRETS: list[str] = []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--preset", default="tiny", choices=("tiny", "base"), help="random checkpoint size"
    )
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="keys-bench-"))
    ckpt = make_checkpoint(work / "ckpt", preset=args.preset, seed=0)
    store = KeyStore(work / "keys.db")
    big = 10**12  # limits that never refuse, so every check runs and none stops the bench
    secret = store.create("bench", rpm=big, items_per_minute=big, concurrency=10_000, credits=big)
    _SECRETS.append(secret)
    path_us = in_process_us(work / "keys.db")
    servers: dict[str, tuple[ServerProcess, str]] = {}
    with redis_server() as redis_url:
        try:
            servers["operator"] = (start(ckpt, "--api-key", OPERATOR), OPERATOR)
            db = ["--keys-db", str(store.path), "--api-key", OPERATOR]
            servers["keys-db"] = (start(ckpt, *db), secret)
            servers["keys-db + redis"] = (start(ckpt, *db, "--redis", redis_url), secret)
            lat: dict[str, list[float]] = {name: [] for name in servers}
            thr: dict[str, list[float]] = {name: [] for name in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    server, key = servers[name]
                    lat[name].append(latency_ms(server.url, key, args.requests))
                    thr[name].append(
                        asyncio.run(_throughput(server.url, key, args.requests, args.concurrency))
                    )
                    print(f"round {r}: {name}: {lat[name][-1]:.3f} ms, {thr[name][-1]:.1f} req/s")
        finally:
            for server, _ in servers.values():
                server.stop()
    shutil.rmtree(work, ignore_errors=True)

    base_lat = statistics.median(lat["operator"])
    base_thr = statistics.median(thr["operator"])
    load = os.getloadavg()
    print()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average at the end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    print(f"{args.preset} checkpoint, requests per measurement: {args.requests}, "
          f"rounds: {args.rounds}, throughput clients: {args.concurrency}")  # fmt: skip
    print(f"in-process key path (auth + limits + metering, no HTTP): {path_us:.1f} us/request")
    print()
    print("| server | median latency (ms) | added (ms) | throughput (req/s) | vs operator |")
    print("|---|---|---|---|---|")
    for name in servers:
        ml, mt = statistics.median(lat[name]), statistics.median(thr[name])
        print(f"| {name} | {ml:.3f} | {ml - base_lat:+.3f} | {mt:.1f} | {mt / base_thr:.3f} |")


if __name__ == "__main__":
    main()
