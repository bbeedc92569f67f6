"""Issue 18, hosted-API hardening: what an anonymous or slow client can make the server spend.

Item 1: every request list is bounded by ``--max-items`` before its items are validated (a 413
like the routes' own count check), so no request builds an unbounded list of validation errors.
Item 2: a request body has ``--body-timeout-s`` to arrive; keyless connections cannot lock key
holders out at the connection cap. Item 3: no body is buffered for a route that takes none (405 /
404 from the head). Item 4: the lone-surrogate scan is iterative and deep nesting is a 400.
Item 7: keep-alive clients sending while SIGTERM arrives each get an answer or a 503 + close.

Time bounds here are generous upper bounds (socket timeouts), never measurements.
"""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel

from blipitm.server import schemas
from blipitm.server.app import create_app
from blipitm.server.middleware import GuardMiddleware, lone_surrogate_param
from blipitm.server.settings import ServerSettings
from server_helpers import ServerProcess, cli_server, free_port, read_response

KEY = "sk-hardening-test"

# -- in-process: validation before the model (no engine needed) ----------------------------------


def _no_engine(_: ServerSettings) -> Any:
    raise RuntimeError("not needed: validation answers before the model")


@asynccontextmanager
async def _client(settings: ServerSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, _no_engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def _post_all(settings: ServerSettings, requests: list[tuple[str, bytes]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with _client(settings) as client:
            headers = {"content-type": "application/json"}
            return [
                await client.post(path, content=body, headers=headers) for path, body in requests
            ]

    return asyncio.run(go())


MAX_ITEMS = 8
OVER = 20_000  # items of the bomb: before the bound, 4 validation errors each


def _bombs() -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, param): one list of every request schema, over the limit, of bad items."""
    junk: list[Any] = [{}] * OVER
    text = "a caption"
    return [
        ("/v1/embeddings", {"input": junk}, "input"),
        ("/v1/score", {"text_1": text, "text_2": junk}, "text_2"),
        ("/v1/score", {"text_1": {"content": junk}, "text_2": text}, "text_1.content"),
        ("/v1/rerank", {"query": text, "documents": junk}, "documents"),
        ("/v2/rerank", {"query": text, "documents": {"content": junk}}, "documents.content"),
        ("/v1/explain", {"image": "data:image/png;base64,AA==", "texts": junk}, "texts"),
        ("/v2/embed", {"input_type": "image", "texts": junk}, "texts"),
        ("/v2/embed", {"input_type": "image", "inputs": junk}, "inputs"),
        (
            "/v2/embed",
            {"input_type": "image", "texts": [text], "embedding_types": junk},
            "embedding_types",
        ),
        ("/v2/embed", {"input_type": "image", "inputs": [{"content": junk}]}, "inputs[0].content"),
        ("/v1/multimodalembeddings", {"inputs": junk}, "inputs"),
        ("/v1/multimodalembeddings", {"inputs": [{"content": junk}]}, "inputs[0].content"),
    ]


def test_every_request_list_is_bounded_before_its_items_are_validated() -> None:
    bombs = _bombs()
    settings = ServerSettings(max_items=MAX_ITEMS)
    answers = _post_all(settings, [(path, json.dumps(body).encode()) for path, body, _ in bombs])
    for (path, _, param), r in zip(bombs, answers, strict=True):
        error = r.json()["error"]
        assert r.status_code == 413, (path, param, r.text[:300])
        assert error["code"] == "too_many_items" and error["param"] == param, (path, error)
        assert f"{OVER} items in one request; the limit is {MAX_ITEMS}" in error["message"]


def test_nested_lists_do_not_multiply_validation_errors() -> None:
    # Token-id arrays inside `input`: each inner list of strings used to be validated item by
    # item (MAX_ITEMS**2 errors here; 4 million at --max-items 2048 within the body limit).
    body = {"input": [["x"] * MAX_ITEMS] * MAX_ITEMS}
    [r] = _post_all(
        ServerSettings(max_items=MAX_ITEMS), [("/v1/embeddings", json.dumps(body).encode())]
    )
    assert r.status_code == 503, r.text  # valid schema; the (absent) model answers


def _list_schemas(schema: Any, bounded: set[int], found: list[dict[str, Any]]) -> None:
    """Every pydantic core ``list`` schema in ``schema``; ``bounded`` collects those wrapped by
    the :data:`schemas.Items` length check."""
    if isinstance(schema, dict):
        if schema.get("type") == "function-before":
            fn = schema.get("function", {}).get("function")
            if fn is schemas._bounded:
                bounded.add(id(schema["schema"]))
        if schema.get("type") == "list":
            found.append(schema)
        for value in schema.values():
            _list_schemas(value, bounded, found)
    elif isinstance(schema, list | tuple):
        for value in schema:
            _list_schemas(value, bounded, found)


def test_no_request_schema_holds_an_unbounded_list() -> None:
    """By construction: a route added later with a plain ``list[...]`` in its body fails here."""
    app = create_app(ServerSettings(), _no_engine)
    bodies: list[type[BaseModel]] = []
    # Every route the app serves (app.routes holds an included router as one entry).
    [guard] = [m for m in app.user_middleware if m.cls is GuardMiddleware]
    for route in guard.kwargs["routes"]:
        if not isinstance(route, APIRoute):
            continue
        dependants = [route.dependant]
        while dependants:  # the body is a parameter of the `ready` dependency
            dependant = dependants.pop()
            dependants += dependant.dependencies
            for param in dependant.body_params:
                model = param.field_info.annotation
                if isinstance(model, type) and issubclass(model, BaseModel):
                    bodies.append(model)
    assert {m.__name__ for m in bodies} >= {
        "EmbeddingRequest",
        "EmbedRequest",
        "MultimodalEmbeddingRequest",
        "ScoreRequest",
        "RerankRequest",
    }
    for model in bodies:
        bounded: set[int] = set()
        found: list[dict[str, Any]] = []
        _list_schemas(model.__pydantic_core_schema__, bounded, found)
        unbounded = [s for s in found if id(s) not in bounded]
        assert not unbounded, (model.__name__, unbounded)
        # A bounded list's items hold no list whose items pydantic validates one by one.
        for s in found:
            inner: list[dict[str, Any]] = []
            _list_schemas(s.get("items_schema", {}), set(), inner)
            assert all(i.get("items_schema", {"type": "any"})["type"] == "any" for i in inner)


def test_a_422_stays_small_whatever_the_number_of_problems() -> None:
    body = {"input": [{}] * MAX_ITEMS, "encoding_format": "nope"}
    [r] = _post_all(
        ServerSettings(max_items=MAX_ITEMS), [("/v1/embeddings", json.dumps(body).encode())]
    )
    assert r.status_code == 422 and "more problems" in r.json()["error"]["message"]
    assert len(r.content) < 500


# -- item 4: the surrogate scan ---------------------------------------------------------------


def test_surrogate_scan_is_iterative() -> None:
    deep: Any = "\ud800"
    for _ in range(50_000):
        deep = [deep]
    from blipitm.server.middleware import _find_surrogate

    assert _find_surrogate({"input": deep}) == "input" + "[0]" * 50_000
    assert _find_surrogate({"a": ["ok", {"b\ud800": 1}]}) == "a[1].b\\ud800"
    assert _find_surrogate({"a": ["ok", "x\udfff"], "b": "\ud800"}) == "a[1]"
    assert lone_surrogate_param(b'{"a": ["\\ud83d\\ude00"]}') is None


def test_deep_nesting_with_a_surrogate_is_a_400_not_a_500() -> None:
    deep = b'{"input": ' + b"[" * 5000 + b'"\\ud800"' + b"]" * 5000 + b"}"
    shallow = b'{"input": ["ok", "\\ud800"]}'
    r, s = _post_all(ServerSettings(), [("/v1/embeddings", deep), ("/v1/embeddings", shallow)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert s.status_code == 400 and s.json()["error"]["param"] == "input[1]", s.text


# -- raw sockets against a real server -----------------------------------------------------------


def _head(method: str, path: str, length: int, key: str | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n"
    if key is not None:
        head += f"Authorization: Bearer {key}\r\n"
    return (head + "\r\n").encode()


def _read_until_close(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def _connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


@pytest.fixture(scope="module")
def keyed(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    flags = ("--api-key", KEY, "--max-connections", "4", "--head-timeout-s", "120")
    with cli_server(tiny_ckpt, *flags, "--body-timeout-s", "2") as s:
        yield s


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/health", 405), ("POST", "/nowhere", 404), ("PUT", "/ready", 405)],
)
def test_a_body_is_never_read_for_a_route_that_takes_none(
    keyed: ServerProcess, method: str, path: str, status: int
) -> None:
    """Answered from the head (today: the 32 MB body is awaited and buffered first)."""
    with _connect(keyed.port, timeout=20) as sock:
        sock.sendall(_head(method, path, 32 * 1024 * 1024))
        answer = _read_until_close(sock)  # the server closes: the body will never be read
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]


def test_a_refused_upload_loses_its_connection(keyed: ServerProcess) -> None:
    """A 401 from the head closes the connection: trickling the refused body on does not keep
    it (today each byte restarts uvicorn's keep-alive timer, for ever)."""
    with _connect(keyed.port, timeout=20) as sock:
        sock.sendall(_head("POST", "/v1/embeddings", 1 << 20, key="wrong"))
        answer = b""
        for _ in range(150):  # one byte every 0.2 s for up to 30 s
            readable = select.select([sock], [], [], 0.2)[0]
            try:
                chunk = sock.recv(65536) if readable else None
                if chunk == b"":
                    break  # closed by the server
                answer += chunk or b""
                sock.sendall(b" ")
            except OSError:
                break
        else:
            pytest.fail(f"the connection stayed open after {answer[:100]!r}")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_a_slow_body_gets_408_and_is_closed(keyed: ServerProcess) -> None:
    body = json.dumps({"input": ["a" * 200]}).encode()
    with _connect(keyed.port) as sock:
        sock.sendall(_head("POST", "/v1/embeddings", len(body), key=KEY))
        answer = b""
        for byte in body:  # one byte every 0.2 s: ~40 s in all, twenty times the timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if select.select([sock], [], [], 0.2)[0]:
                answer = _read_until_close(sock)
                break
        else:
            pytest.fail("the server waited for the whole slow body")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code": "request_timeout"' in answer


def test_keyless_connections_cannot_lock_out_key_holders(keyed: ServerProcess) -> None:
    """Four keyless connections (the cap) sending a head slowly; a client with a key still gets
    in, on a new connection, again and again. Today: 503 too_many_connections."""
    held = [_connect(keyed.port) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # never finished (head timeout 120 s)
        for _ in range(3):
            with _connect(keyed.port) as sock:
                sock.sendall(
                    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + KEY.encode()
                    + b"\r\nConnection: close\r\n\r\n"
                )
                answer = _read_until_close(sock)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        # The displaced keyless connections were told why, and closed.
        told = [s for s in held if select.select([s], [], [], 5)[0]]
        assert told and all(s.recv(65536).startswith(b"HTTP/1.1 503 ") for s in told)
    finally:
        for sock in held:
            sock.close()


# -- item 7: SIGTERM with keep-alive clients -------------------------------------------------------


def test_sigterm_answers_keep_alive_clients_mid_sequence(tiny_ckpt: Path) -> None:
    """Clients sending request after request on kept-alive connections while SIGTERM arrives:
    every request sent is answered, 200 or 503 + Connection: close; none meets a closed socket."""
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(tiny_ckpt), "--host", "127.0.0.1"]
    server = ServerProcess([*argv, "--port", str(port), "--drain-timeout-s", "60"], port)
    n = 8
    failures: list[str] = []
    answered = [0] * n
    try:
        server.wait_ready()
        started = threading.Barrier(n + 1)

        def client(i: int) -> None:
            body = json.dumps({"input": [f"text {i}"]}).encode()
            request = _head("POST", "/v1/embeddings", len(body)) + body
            with _connect(port, timeout=60) as sock:
                started.wait()
                while True:
                    try:
                        sock.sendall(request)
                        status, headers, _ = read_response(sock)
                    except (OSError, EOFError) as e:
                        failures.append(f"client {i}, request {answered[i] + 1}: {e!r}")
                        return
                    answered[i] += 1
                    if status == 503:
                        if headers.get("connection") != "close":
                            failures.append(f"client {i}: 503 without Connection: close")
                        return
                    if status != 200:
                        failures.append(f"client {i}: status {status}")
                        return
                    if headers.get("connection") == "close":
                        return  # told: the last answer on this connection

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        deadline = time.monotonic() + 60
        while min(answered) < 3 and time.monotonic() < deadline:  # every client mid-sequence
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert server.proc.wait(timeout=90) == 0, server.output()
    finally:
        server.stop()
    assert not failures, "\n".join(failures) + "\n" + server.output()[-3000:]
