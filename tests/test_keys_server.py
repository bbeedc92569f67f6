"""Per-key API keys against real ``blipitm serve`` processes on the tiny checkpoint, driven by the
stock OpenAI SDK and httpx: rate limits and the SDK's retry, credits that run out (no retry),
parallel requests that never overdraw, refunds, model access, revocation, usage across SIGTERM
and SIGKILL, two replicas sharing a real redis-server, and secrets that never leak."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from blipitm.keys import KeyStore
from redis_helpers import redis_server
from server_helpers import ServerProcess, cli_server, data_uri, free_port, png_bytes

MODEL = "tiny-blip"
OPERATOR = "operator-static-key"
WINDOW_S = 3  # --rate-window-s: per-"minute" limits refill over 3 s, so retries come quickly
SECRETS: list[str] = []  # every secret this module created, checked against logs and metrics


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def create(store: KeyStore, name: str, **limits: Any) -> str:
    secret = store.create(name, **limits)
    SECRETS.append(secret)
    return secret


def embed(server: ServerProcess, secret: str, texts: list[str] | None = None) -> httpx.Response:
    body = {"model": MODEL, "input": texts or ["a red square"]}
    return httpx.post(server.url + "/v1/embeddings", json=body, headers=auth(secret), timeout=60)


def usage(server: ServerProcess, secret: str) -> dict[str, Any]:
    r = httpx.get(server.url + "/v1/usage", headers=auth(secret), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def requests_seen(report: dict[str, Any], endpoint: str = "/v1/embeddings") -> dict[int, int]:
    out: dict[int, int] = {}
    for row in report["data"]:
        if row["endpoint"] == endpoint:
            out[row["status"]] = out.get(row["status"], 0) + row["requests"]
    return out


def serve_flags(db: Path, *extra: str) -> list[str]:
    return [
        "--keys-db", str(db),
        "--api-key", OPERATOR,
        "--served-model-name", MODEL,
        "--rate-window-s", str(WINDOW_S),
        "--image-credits", "3",
        "--max-wait-ms", "2",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.db")


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, store: KeyStore) -> Iterator[ServerProcess]:
    with cli_server(tiny_ckpt, *serve_flags(store.path)) as s:
        yield s


def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    """Polls ``predicate`` (bounded): for what the server picks up once a second."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def wait_for_key(server: ServerProcess, secret: str) -> None:
    """A key created while the server runs is known to it within about a second."""
    wait_until(lambda: httpx.get(server.url + "/v1/usage", headers=auth(secret)).status_code == 200)


# -- through the OpenAI SDK -------------------------------------------------------------------


def test_sdk_retries_after_retry_after(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "sdk-rpm", rpm=2)
    wait_for_key(server, secret)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=2)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="one")
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] in ("0", "1")
    assert raw.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    client.embeddings.create(model=MODEL, input="two")
    # Over 2 per window: the server answers 429 with retry-after-ms, the SDK waits and succeeds.
    third = client.embeddings.create(model=MODEL, input="three")
    assert len(third.data) == 1
    seen = requests_seen(usage(server, secret))
    assert seen[200] == 3 and seen.get(429, 0) >= 1, seen
    client.close()


def test_rate_limit_response_shape(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "shape-rpm", rpm=1)
    wait_for_key(server, secret)
    assert embed(server, secret).status_code == 200
    r = embed(server, secret)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1 and 0 < int(r.headers["retry-after-ms"]) <= 3000
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in r.headers


def test_sdk_does_not_retry_insufficient_quota(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "sdk-credits", credits=1)
    wait_for_key(server, secret)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=2)
    client.embeddings.create(model=MODEL, input="the only credit")
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=MODEL, input="one too many")
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    seen = requests_seen(usage(server, secret))
    assert seen == {200: 1, 429: 1}, seen  # the SDK sent the refused request once, no retries
    client.close()


# -- credits ----------------------------------------------------------------------------------


async def _parallel(server: ServerProcess, secret: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        body = {"model": MODEL, "input": ["one text"]}
        return await asyncio.gather(
            *(
                client.post(server.url + "/v1/embeddings", json=body, headers=auth(secret))
                for _ in range(n)
            )
        )


def test_parallel_requests_bill_exactly_the_credits(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "parallel", credits=10)
    wait_for_key(server, secret)
    # A request that fails after its reservation (an undecodable image) is refunded.
    bad = {"model": MODEL, "input": [data_uri(b"not an image")]}
    r = httpx.post(server.url + "/v1/embeddings", json=bad, headers=auth(secret), timeout=60)
    assert r.status_code == 400
    assert usage(server, secret)["remaining"]["credits"] == 10

    responses = asyncio.run(_parallel(server, secret, 50))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(429) == 40, codes
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
        "insufficient_quota"
    }
    report = usage(server, secret)
    assert report["remaining"]["credits"] == 0
    billed = sum(row["credits"] for row in report["data"])
    assert billed == 10
    # The store gets the same within about a second: balance and usage rows agree.
    wait_until(lambda: store.get("parallel").credits_used == 10)
    assert store.get("parallel").credits_remaining == 0
    assert sum(row.credits for row in store.usage("parallel")) == 10


def test_images_cost_image_credits(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "images", credits=100)
    wait_for_key(server, secret)
    inputs = [data_uri(png_bytes((200, 30, 30))), data_uri(png_bytes((30, 200, 30)))]
    body = {"model": MODEL, "input": inputs}
    r = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth(secret), timeout=60)
    assert r.status_code == 200, r.text
    report = usage(server, secret)
    assert report["remaining"]["credits"] == 100 - 2 * 3  # --image-credits 3
    (row,) = [x for x in report["data"] if x["endpoint"] == "/v1/embeddings"]
    assert (row["images"], row["texts"], row["credits"]) == (2, 0, 6)
    assert row["tokens"] == r.json()["usage"]["total_tokens"]


# -- who may call what ------------------------------------------------------------------------


def test_unknown_revoked_and_expired_keys_get_401(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "to-revoke")
    expired = create(store, "expired", expires=time.time() - 60)
    wait_for_key(server, secret)
    for token in ("bk-unknown", expired):
        r = embed(server, token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert token not in r.text
    store.revoke("to-revoke")
    wait_until(lambda: embed(server, secret).status_code == 401)
    r = embed(server, secret)
    assert r.json()["error"]["code"] == "invalid_api_key" and "revoked" in r.text
    assert secret not in r.text


def test_model_access(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "other-model", models=["some-other-model"])
    wait_for_key(server, secret)
    r = embed(server, secret)  # names the served model, which the key may not use
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    body = {"input": ["no model named"]}
    r = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth(secret), timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(server.url + "/v1/models", headers=auth(secret), timeout=30).json()
    assert models["data"] == []
    assert usage(server, secret)["remaining"]["credits"] is None  # nothing was billed anyway


def test_operator_keys_stay_unlimited(server: ServerProcess) -> None:
    for _ in range(3):
        assert embed(server, OPERATOR).status_code == 200
    r = httpx.get(server.url + "/v1/usage", headers=auth(OPERATOR), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_metered_key"
    assert "x-ratelimit-limit-requests" not in embed(server, OPERATOR).headers


def test_per_key_metrics_and_no_secret_anywhere(server: ServerProcess, store: KeyStore) -> None:
    secret = create(store, "metrics-key")
    wait_for_key(server, secret)
    assert embed(server, secret).status_code == 200
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'blipitm_key_requests_total{key="metrics-key",status="200"} 1.0' in metrics
    assert 'blipitm_key_credits_total{key="metrics-key"} 1.0' in metrics
    listed = "\n".join(repr(r) + str(r.as_dict()) for r in store.records())
    for s in SECRETS:
        assert s not in metrics and s not in listed and s not in server.output()
        assert s[3:] not in server.output()


# -- restarts ---------------------------------------------------------------------------------


def _state(server: ServerProcess, secret: str) -> tuple[int, dict[int, int]]:
    report = usage(server, secret)
    return report["remaining"]["credits"], requests_seen(report)


def _start(ckpt: Path, db: Path) -> ServerProcess:
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(ckpt), "--host", "127.0.0.1"]
    server = ServerProcess([*argv, "--port", str(port), *serve_flags(db)], port)
    server.wait_ready()
    return server


def test_usage_and_balance_survive_restarts(tiny_ckpt: Path, tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    secret = create(store, "restart", credits=100)
    first = _start(tiny_ckpt, db)
    try:
        for _ in range(4):
            assert embed(first, secret).status_code == 200
        before = _state(first, secret)
        assert before == (96, {200: 4})
        first.proc.send_signal(signal.SIGTERM)  # drains, then the shutdown flushes
        assert first.proc.wait(timeout=60) == 0
    finally:
        first.stop()
    assert store.get("restart").credits_remaining == 96  # nothing lost on SIGTERM

    second = _start(tiny_ckpt, db)
    try:
        assert _state(second, secret) == before
        for _ in range(3):
            assert embed(second, secret).status_code == 200
        # SIGKILL loses at most the last second: once a flush has landed, nothing is lost.
        wait_until(lambda: store.get("restart").credits_remaining == 93)
        second.proc.send_signal(signal.SIGKILL)
        second.proc.wait(timeout=30)
    finally:
        second.stop()

    third = _start(tiny_ckpt, db)
    try:
        assert _state(third, secret) == (93, {200: 7})
        # A kill right after requests may lose those of the last second, never more, and the
        # balance and the usage rows stay in step either way (one transaction per flush).
        for _ in range(2):
            assert embed(third, secret).status_code == 200
        third.proc.send_signal(signal.SIGKILL)
        third.proc.wait(timeout=30)
    finally:
        third.stop()
    record = store.get("restart")
    rows = store.usage("restart")
    assert 7 <= sum(r.requests for r in rows) <= 9
    assert record.credits_remaining == 100 - sum(r.credits for r in rows)


# -- several replicas -------------------------------------------------------------------------


def test_two_replicas_share_one_rpm_through_redis(tiny_ckpt: Path, tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    secret = create(store, "shared", rpm=5, credits=1000)
    with redis_server() as url:
        flags = [*serve_flags(db, "--redis", url), "--rate-window-s", "60"]
        with cli_server(tiny_ckpt, *flags) as a, cli_server(tiny_ckpt, *flags) as b:
            codes = [embed(s, secret).status_code for s in (a, b) * 6]
            # 5 per 60 s for both together (one more could refill during the test: 1 per 12 s).
            assert codes.count(200) in (5, 6) and codes[:5] == [200] * 5, codes
            assert set(codes[5:]) <= {200, 429}
            ok = codes.count(200)
            # Credits are shared too, and each replica reports the same balance.
            assert usage(a, secret)["remaining"]["credits"] == 1000 - ok
            assert usage(b, secret)["remaining"]["credits"] == 1000 - ok
            for s in (a, b):
                assert url not in s.output() and secret not in s.output()
    # Each replica flushed its own usage on SIGTERM: the store has every request.
    rows = store.usage("shared")
    assert sum(r.requests for r in rows if r.endpoint == "/v1/embeddings") == 12
    assert store.get("shared").credits_used == ok
