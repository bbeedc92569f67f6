"""Credits bound compute (issue 18 item 6): a metered request whose client leaves, or whose
deadline passes, after the inference worker took its work is billed for that work; what the
worker never started is refunded. Against a live server process whose worker is held at a gate
(tests/gated_server.py), never raced against."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from blipitm.keys import KeyStore
from server_helpers import TESTS, ServerProcess, data_uri, free_port, metric, png_bytes, until

SETTINGS = {"max_queue": 4, "max_batch_size": 1, "max_wait_ms": 0, "request_timeout_s": 60}


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.db")


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, gates: Path, store: KeyStore) -> Iterator[ServerProcess]:
    port = free_port()
    settings = {**SETTINGS, "keys_db": str(store.path)}
    argv = [str(TESTS / "gated_server.py"), str(tiny_ckpt), str(port), str(gates)]
    server = ServerProcess([*argv, json.dumps(settings)], port)
    try:
        server.wait_ready(on_not_ready=lambda: (gates / "load").touch())
        yield server
    finally:
        (gates / "load").touch()
        for name in ("w", "e"):
            (gates / f"release-{name}").touch()  # never leave the worker waiting
        server.stop()


def send(server: ServerProcess, path: str, secret: str, body: object) -> socket.socket:
    """A POST over a raw socket; the caller closes it to leave before the answer."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head + data)
    return sock


def left_rows(store: KeyStore, name: str, requests: int) -> list[int]:
    """The credits of the key's 499 rows once ``requests`` of them reached the store."""
    rows: list[int] = []

    def landed() -> bool:
        nonlocal rows
        found = [r for r in store.usage(name) if r.status == 499]
        rows = [r.credits for r in found]
        return sum(r.requests for r in found) == requests

    until(landed, "the usage to be written (once a second)")
    return rows


def test_a_client_that_leaves_pays_for_the_work_done(
    server: ServerProcess, gates: Path, store: KeyStore
) -> None:
    """Request A (3 texts) is on the worker when its client leaves: billed 3. Request B (2 texts)
    is still queued when its client leaves: skipped by the worker and refunded. Before the fix
    both were refunded: the compute of A was free."""
    secret = store.create("leaver", credits=100)
    until(lambda: httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {secret}"})
          .status_code == 200, "the server to know the key")  # fmt: skip
    a = send(server, "/v1/embeddings", secret, {"input": ["hold-w", "a2", "a3"]})
    until((gates / "entered-w").exists, "the worker to take A")
    b = send(server, "/v1/embeddings", secret, {"input": ["b1", "b2"]})
    until(lambda: metric(server, "blipitm_queue_depth") == 1, "B queued")
    b.close()
    until(
        lambda: metric(server, "blipitm_rejected_total", reason="client_disconnected") >= 1,
        "B gone",
    )
    a.close()
    until(
        lambda: metric(server, "blipitm_rejected_total", reason="client_disconnected") >= 2,
        "A gone",
    )
    (gates / "release-w").touch()
    assert sorted(left_rows(store, "leaver", 2)) == [3]  # one 499 row: A's 3, B's 0
    assert store.get("leaver").credits_remaining == 97
    assert "embedded: b1" not in server.output()  # B was never computed, so it is not billed


def test_an_explanation_left_halfway_pays_for_its_captions_done(
    server: ServerProcess, gates: Path, store: KeyStore
) -> None:
    """4 captions are explained one at a time; the client leaves while the second is on the
    worker. Billed: the first (with the image, 1 credit) and the second; the last two, never
    started, are refunded. Before the fix: 0 of the 5 reserved."""
    secret = store.create("explainer", credits=100)
    until(lambda: httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {secret}"})
          .status_code == 200, "the server to know the key")  # fmt: skip
    body = {"image": data_uri(png_bytes((200, 10, 10))), "texts": ["c1", "hold-e", "c3", "c4"]}
    sock = send(server, "/v1/explain", secret, body)
    until((gates / "entered-e").exists, "the worker to take the second caption")
    before = metric(server, "blipitm_rejected_total", reason="client_disconnected")
    sock.close()
    until(
        lambda: metric(server, "blipitm_rejected_total", reason="client_disconnected") > before,
        "the disconnect to be seen",
    )
    (gates / "release-e").touch()
    assert left_rows(store, "explainer", 1) == [3]  # c1 + the image + hold-e
    assert store.get("explainer").credits_remaining == 97
    out = server.output()
    assert "explained: c1" in out and "explained: c3" not in out
