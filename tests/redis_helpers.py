"""A real ``redis-server`` (Debian's package) on 127.0.0.1, started and stopped by the test.

No persistence (``--save ''``, no AOF), so nothing is written to disk. Outside CI a machine without
the package skips with the reason; under CI (``CI=true``, where ``.ci/run`` installs it) a missing
server fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from server_helpers import free_port


def redis_server_path() -> str:
    path = shutil.which("redis-server")
    if path is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run installs it, so CI must have it")
        pytest.skip(reason)
    return path


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields ``redis://127.0.0.1:PORT/0``."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [redis_server_path(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
