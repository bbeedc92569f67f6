"""Helpers for the server tests: real server processes, test images, a loopback image server."""

from __future__ import annotations

import base64
import http.server
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import httpx
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of ``width x height`` zeros (tiny file)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class ServerProcess:
    """A server process on 127.0.0.1; ``stop`` always terminates it (kill after a grace period)."""

    def __init__(self, argv: Sequence[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = io.BytesIO()
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "src"), full_env.get("PYTHONPATH", "")]
        )
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)

    def output(self) -> str:
        return self.log.getvalue().decode(errors="replace")

    def wait_ready(
        self, timeout: float = 90.0, on_not_ready: Callable[[], None] | None = None
    ) -> bool:
        """Poll /ready until 200; returns whether a 503 was seen first.

        Until ready, the only answer allowed is the documented 503 (``model_not_ready`` with
        ``Retry-After``). ``on_not_ready`` runs once, at the first 503: a server whose loading
        is held until then must pass through 503, so its caller can assert that it did.
        """
        deadline = time.monotonic() + timeout
        saw_not_ready = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                return saw_not_ready
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
            if not saw_not_ready and on_not_ready is not None:
                on_not_ready()
            saw_not_ready = True
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


@contextmanager
def cli_server(
    model: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """``python -m blipitm.cli.main serve`` on a free port."""
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(model), "--host", "127.0.0.1"]
    server = ServerProcess([*argv, "--port", str(port), *flags], port, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- a loopback image server ----------------------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@contextmanager
def image_server(
    routes: dict[str, tuple[int, dict[str, str], bytes]],
) -> Iterator[str]:
    """Serve ``routes`` (path -> status, headers, body) on 127.0.0.1; yields the base URL."""
    handler = type("Handler", (_ImageHandler,), {"routes": routes})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One complete response; EOFError if the server closed before it was complete."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before a complete response head (got {buf!r})")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed in the middle of a response body")
        body += chunk
    return int(status_line.split()[1]), headers, body


def until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The value of one Prometheus sample of ``server`` with exactly ``labels`` (0 while it has
    none); without labels, the sum of the metric's samples over all its labels (a per-model
    gauge, say)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    if not labels:
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found)
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
