"""The connection layer and start-up of a real ``blipitm serve`` process, driven with raw sockets:
request-head timeout (idle and slow-loris clients), the connection cap, a SIGTERM drain that resets
nothing and exits 0, and start-up failures that print one clean line."""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import blipitm
from blipitm.cli.main import main
from blipitm.retrieval import build_index
from blipitm.testing.make_checkpoint import make_checkpoint
from server_helpers import REPO, TESTS, ServerProcess, cli_server, free_port, read_response

# -- raw HTTP -------------------------------------------------------------------------------------


def request_bytes(method: str, path: str, body: object | None = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


# -- request-head timeout and connection cap (item 2) ---------------------------------------------


@pytest.fixture(scope="module")
def short_head_timeout(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    with cli_server(tiny_ckpt, "--head-timeout-s", "1") as s:
        yield s


def test_idle_connections_are_closed(short_head_timeout: ServerProcess) -> None:
    idle = [connect(short_head_timeout.port) for _ in range(5)]
    for sock in idle:  # socket timeout 30 s: today they stay open forever
        assert closed_by_server(sock) == b""  # nothing was asked: a quiet close
        sock.close()
    assert httpx.get(short_head_timeout.url + "/health", timeout=30).status_code == 200


def test_slow_loris_gets_408_and_is_closed(short_head_timeout: ServerProcess) -> None:
    # One byte every 0.2 s: the head would take ~10 s, ten times the timeout.
    head = request_bytes("GET", "/health") + b"X-Padding: " + b"a" * 20 + b"\r\n\r\n"
    with connect(short_head_timeout.port) as sock:
        answer = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if select.select([sock], [], [], 0.2)[0]:
                answer = closed_by_server(sock)
                break
        else:
            pytest.fail("the server waited for the whole slow head")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code": "request_timeout"' in answer


@pytest.fixture(scope="module")
def capped(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    with cli_server(tiny_ckpt, "--max-connections", "4", "--head-timeout-s", "120") as s:
        yield s


def test_connections_over_the_cap_get_503_at_once(capped: ServerProcess) -> None:
    held = [connect(capped.port) for _ in range(4)]
    try:
        with connect(capped.port) as extra:
            # Answered before it sends anything: nothing of it is parsed.
            status, headers, body = read_response(extra)
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            assert closed_by_server(extra) == b""
        # A held connection still works, and a freed slot is given to the next client.
        held[0].sendall(request_bytes("GET", "/health"))
        assert read_response(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the server sees the closes asynchronously
        with connect(capped.port) as sock:
            sock.sendall(request_bytes("GET", "/health"))
            if read_response(sock)[0] == 200:
                break
        assert time.monotonic() < deadline, "closed connections were never released"
        time.sleep(0.1)


# -- SIGTERM drains (item 3) ----------------------------------------------------------------------


def _start(model: Path, port: int, *flags: str) -> ServerProcess:
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(model), "--host", "127.0.0.1"]
    return ServerProcess([*argv, "--port", str(port), *flags], port)


def _wait_listening(server: ServerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.output()
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.02)
    pytest.fail(f"never listened:\n{server.output()}")


@pytest.mark.parametrize("offset", ["0.0", "0.3", "loaded"])
def test_sigterm_answers_every_accepted_request(tiny_ckpt: Path, offset: str) -> None:
    """N clients connect (the kernel accepts them) before SIGTERM; half send their request before
    the signal, half once the server has begun draining. Every one gets a complete answer, 200 or
    503 + Retry-After; none is reset or closed unanswered; the process exits 0."""
    port = free_port()
    server = _start(tiny_ckpt, port, "--drain-timeout-s", "60", "--max-wait-ms", "50")
    try:
        if offset == "loaded":
            server.wait_ready()
        else:
            _wait_listening(server)
        n = 16
        connected = threading.Barrier(n + 1)
        draining = threading.Event()
        results: list[object] = [None] * n

        def client(i: int) -> None:
            try:
                sock = connect(port, timeout=90)
            except BaseException as e:
                results[i] = e
                connected.abort()
                return
            with sock:
                connected.wait()
                if i % 2:  # a connection with no request yet when the drain begins
                    draining.wait()
                try:
                    sock.sendall(request_bytes("POST", "/v1/embeddings", {"input": [f"text {i}"]}))
                    results[i] = read_response(sock)
                except BaseException as e:
                    results[i] = e

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        connected.wait(timeout=60)
        if offset != "loaded":
            time.sleep(float(offset))
        else:
            time.sleep(0.05)  # under load: the first requests are with the worker
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "shutting down" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.01)
        draining.set()
        for t in threads:
            t.join(timeout=120)
        assert server.proc.wait(timeout=90) == 0, server.output()
    finally:
        server.stop()
    for i, result in enumerate(results):
        assert isinstance(result, tuple), f"client {i}: {result!r}\n{server.output()}"
        status, headers, _ = result
        assert status == 200 or (status == 503 and "retry-after" in headers), (i, result)


# -- start-up failures: one line (items 14, 15, 18) -----------------------------------------------


def run_serve(
    *args: str, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """``serve`` in a child process; ``env`` values of None unset the variable. ``args`` name
    the port (a free one): the default, 8000, may be the README's own server's."""
    assert "--port" in args, "give serve an explicit free port: --port, str(free_port())"
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "blipitm.cli.main", "serve", "--host", "127.0.0.1", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]


def test_port_in_use_fails_before_the_model_loads(tiny_ckpt: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--model", str(tiny_ckpt), "--port", str(port))
    out = lines(result)
    assert result.returncode == 2
    assert len(out) == 1 and out[0].startswith("blipitm: error: "), out  # nothing loaded or logged
    assert f"127.0.0.1:{port}" in out[0] and "--port" in out[0]


def test_hub_unreachable_is_one_clean_line(tmp_path: Path) -> None:
    env: dict[str, str | None] = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "HF_HUB_CACHE": None,  # HF_HOME decides
        "HUGGINGFACE_HUB_CACHE": None,
    }
    result = run_serve("--model", "blipitm-tests/not-cached", "--port", str(free_port()), env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out
    assert out.count("could not be reached") == 1 and out.count("blipitm: error:") == 1
    assert "--model /path/to/not-cached" in out
    assert len(lines(result)) <= 12, out


def test_missing_index_blames_the_index(tiny_ckpt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nosuch"
    result = run_serve(
        "--model", str(tiny_ckpt), "--index", str(missing), "--port", str(free_port())
    )
    out = lines(result)
    assert result.returncode == 2
    assert len(out) == 1 and out[0].startswith("blipitm: error: "), out  # failed before loading
    assert str(missing) in out[0] and "model" not in out[0].split(str(missing))[0]


def test_index_of_another_model_blames_the_index(tiny_ckpt: Path, tmp_path: Path) -> None:
    other = blipitm.load(make_checkpoint(tmp_path / "seed1", preset="tiny", seed=1))
    (tmp_path / "captions.txt").write_text("a dog\na cat\n")
    index, _ = build_index(other, [tmp_path / "captions.txt"], tmp_path / "index")
    index.close()
    result = run_serve(
        "--model", str(tiny_ckpt), "--index", str(tmp_path / "index"), "--port", str(free_port())
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out and "cannot load the model" not in out
    errors = [ln for ln in lines(result) if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("blipitm: error: "), out


GUARD = "test_no_test_starts_serve_on_a_port_it_did_not_pick"  # starts one without, on purpose


def test_no_test_starts_serve_on_a_port_it_did_not_pick(serve_port_trap: int) -> None:
    """Guard for issue 18 item 13: a test that starts ``serve`` names a free ``--port``.

    Statically, every ``serve`` command line in the tests (an argv list with ``"serve"`` after
    ``blipitm.cli.main``, or a ``run_serve`` call) comes with ``--port``. At run time, a
    ``serve`` that still lacks one gets the port ``conftest.serve_port_trap`` holds, never 8000:
    it fails every time, not only while the README's server runs in another shell.
    """
    missing: list[str] = []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for scope in ast.walk(tree):
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef) and scope.name != GUARD:
                missing += _serve_without_port(path, scope)
    assert not missing, f"serve started without --port: {missing}"
    assert os.environ["BLIPITM_PORT"] == str(serve_port_trap)
    result = subprocess.run(
        [sys.executable, "-m", "blipitm.cli.main", "serve", "--model", "unused"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and f"127.0.0.1:{serve_port_trap}" in result.stderr, result


def _serve_without_port(path: Path, function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Where ``function`` builds a ``serve`` command line and never says ``--port``."""
    strings = {n.value for n in ast.walk(function) if isinstance(n, ast.Constant)}
    found = []
    for node in ast.walk(function):
        if isinstance(node, ast.List):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            starts = any(
                words[i : i + 2] == ["blipitm.cli.main", "serve"] for i in range(len(words))
            )
            if starts and "--port" not in strings:
                found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_serve":
            args = {a.value for a in node.args if isinstance(a, ast.Constant)}
            if "--port" not in args:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_served_model_name_help_shows_its_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("default: the --model string") == 1
    assert "(default: None)" not in text
