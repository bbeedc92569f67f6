"""Backpressure, deadlines and disconnects against a live server process (tests/gated_server.py):
429 with Retry-After, 504, a client that leaves while queued or in the middle of its body, and
readiness that really passes through 503. The worker is held at a gate, never raced against."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_helpers import TESTS, ServerProcess, free_port, metric, until

SETTINGS = {"max_queue": 1, "max_batch_size": 1, "max_wait_ms": 0, "request_timeout_s": 8}


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, gates: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [str(TESTS / "gated_server.py"), str(tiny_ckpt), str(port), str(gates)]
    server = ServerProcess([*argv, json.dumps(SETTINGS)], port)
    try:
        # Loading is held until the helper has seen /ready answer 503.
        saw_not_ready = server.wait_ready(on_not_ready=lambda: (gates / "load").touch())
        assert saw_not_ready, "/ready must answer 503 while the model loads"
        yield server
    finally:
        (gates / "load").touch()
        for name in ("1", "2"):
            (gates / f"release-{name}").touch()  # never leave the worker waiting
        server.stop()


def raw_request(
    server: ServerProcess, body: bytes, content_length: int | None = None
) -> socket.socket:
    """Send a POST /v1/embeddings over a raw socket (the body possibly cut short); the caller
    closes the socket to leave."""
    length = len(body) if content_length is None else content_length
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head + body)
    return sock


def embed(client: httpx.AsyncClient, text: str) -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(client.post("/v1/embeddings", json={"input": [text]}))


def test_queue_full_429_then_deadline_504(server: ServerProcess, gates: Path) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            held = embed(client, "hold-1")
            await asyncio.to_thread(until, (gates / "entered-1").exists, "the worker")
            queued = embed(client, "queued")
            await asyncio.to_thread(
                until, lambda: metric(server, "blipitm_queue_depth") == 1, "queue depth 1"
            )
            refused = await client.post("/v1/embeddings", json={"input": ["no room"]})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            for r in await asyncio.gather(held, queued):  # the worker is still held: 504
                assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        (gates / "release-1").touch()
        until(lambda: metric(server, "blipitm_queue_depth") == 0, "the queue to drain")

    asyncio.run(main())
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["after the jam"]}, timeout=60)
    assert r.status_code == 200
    out = server.output()
    assert "embedded: hold-1" in out and "embedded: after the jam" in out
    assert "embedded: queued" not in out  # timed out in the queue: cancelled, never computed
    assert metric(server, "blipitm_rejected_total", reason="queue_full") == 1
    assert metric(server, "blipitm_rejected_total", reason="timeout") == 2


def test_client_leaving_while_queued_is_dropped(server: ServerProcess, gates: Path) -> None:
    route = {"route": "/v1/embeddings"}
    before = metric(server, "blipitm_requests_total", **route, status="499")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            held = embed(client, "hold-2")
            await asyncio.to_thread(until, (gates / "entered-2").exists, "the worker")
            sock = raw_request(server, json.dumps({"input": ["gone"]}).encode())
            await asyncio.to_thread(
                until, lambda: metric(server, "blipitm_queue_depth") == 1, "queue depth 1"
            )
            sock.close()
            await asyncio.to_thread(
                until,
                lambda: metric(server, "blipitm_rejected_total", reason="client_disconnected") == 1,
                "the disconnect to be seen",
            )
            (gates / "release-2").touch()
            assert (await held).status_code == 200

    asyncio.run(main())
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["later"]}, timeout=60)
    assert r.status_code == 200
    assert "embedded: later" in server.output()
    assert "embedded: gone" not in server.output()  # the worker skipped the abandoned request
    assert metric(server, "blipitm_requests_total", **route, status="499") == before + 1


def test_client_leaving_mid_body_counts_499_not_500(server: ServerProcess) -> None:
    route = {"route": "/v1/embeddings"}
    before = {
        s: metric(server, "blipitm_requests_total", **route, status=s) for s in ("499", "500")
    }
    sock = raw_request(server, b'{"input": ["a cut', content_length=1000)
    sock.close()
    until(
        lambda: (
            metric(server, "blipitm_requests_total", **route, status="499") == before["499"] + 1
        ),
        "the abandoned request to be counted",
    )
    assert metric(server, "blipitm_requests_total", **route, status="500") == before["500"]
    assert 'status="500"' not in httpx.get(server.url + "/metrics").text
