"""The app in-process (httpx over ASGI, lifespan run by hand), where a test needs control over the
engine: backpressure, deadline, disconnects, readiness, unexpected errors; and URL fetching from a
loopback image server, which only the test-only switch allows."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.requests import Request

import blipitm
from blipitm.engine import Engine, TextFeatures
from blipitm.engine.jobs import EmbedTexts
from blipitm.server.app import create_app
from blipitm.server.context import RequestContext
from blipitm.server.errors import APIError
from blipitm.server.settings import ServerSettings
from server_helpers import data_uri, image_server, png_bytes


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    return blipitm.load(tiny_ckpt)


class Shared:
    """The module's engine, shared by several apps: an app's shutdown must not close it."""

    def __init__(self, real: Engine) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def close(self) -> None:
        pass


class GatedEngine(Shared):
    """The real engine, but ``encode_texts`` waits for ``gate`` and records what it was given."""

    def __init__(self, real: Engine, gate: threading.Event) -> None:
        super().__init__(real)
        self.gate = gate
        self.entered = threading.Event()
        self.seen: list[str] = []

    def encode_texts(self, texts: list[str]) -> TextFeatures:
        self.entered.set()
        assert self.gate.wait(20)
        self.seen += texts
        return self.real.encode_texts(texts)


@asynccontextmanager
async def running(
    settings: ServerSettings, factory: Callable[[ServerSettings], Any], wait_ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings, factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            if wait_ready:
                for _ in range(300):
                    if (await client.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            yield client, app.state.blipitm


async def _until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_queue_full_429_then_deadline_504(engine: Engine) -> None:
    gate = threading.Event()
    gated = GatedEngine(engine, gate)
    settings = ServerSettings(max_queue=1, max_batch_size=1, max_wait_ms=0, request_timeout_s=1.5)

    async def main() -> None:
        async with running(settings, lambda s: gated) as (client, state):
            post = lambda text: client.post("/v1/embeddings", json={"input": [text]})  # noqa: E731
            running_req = asyncio.create_task(post("held by the worker"))
            await _until(gated.entered.is_set)
            queued_req = asyncio.create_task(post("waits in the queue"))
            await _until(lambda: state.require_ready().batcher.depth == 1)
            refused = await post("no room")
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            held, queued = await asyncio.gather(running_req, queued_req)
            for r in (held, queued):
                assert r.status_code == 504
                assert r.json()["error"]["code"] == "timeout"
            gate.set()
            await _until(lambda: state.require_ready().batcher.depth == 0)
            ok = await post("after the jam")
            assert ok.status_code == 200
            # The timed-out queued request was cancelled and never computed.
            assert "waits in the queue" not in gated.seen
            assert "held by the worker" in gated.seen and "after the jam" in gated.seen
            metrics = (await client.get("/metrics")).text
            assert 'blipitm_rejected_total{reason="queue_full"} 1.0' in metrics
            assert 'blipitm_rejected_total{reason="timeout"} 2.0' in metrics

    try:
        asyncio.run(main())
    finally:
        gate.set()


def test_disconnected_client_work_is_dropped(engine: Engine) -> None:
    gate = threading.Event()
    gated = GatedEngine(engine, gate)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0)

    async def main() -> None:
        async with running(settings, lambda s: gated) as (client, state):
            busy = asyncio.create_task(client.post("/v1/embeddings", json={"input": "busy"}))
            await _until(gated.entered.is_set)

            async def receive() -> dict[str, Any]:
                return {"type": "http.disconnect"}

            request = Request({"type": "http", "method": "POST", "headers": []}, receive)
            assert state.models is not None
            model, up = state.models.default, state.require_ready()
            deadline = asyncio.get_running_loop().time() + 10
            ctx = RequestContext(None, request, state, model, up, deadline)
            with pytest.raises(APIError) as info:
                await ctx.run(EmbedTexts(["gone"]), lambda f: f)
            assert info.value.status == 499
            gate.set()
            assert (await busy).status_code == 200
            ok = await client.post("/v1/embeddings", json={"input": "later"})
            assert ok.status_code == 200
            assert "gone" not in gated.seen

    try:
        asyncio.run(main())
    finally:
        gate.set()


def test_ready_only_after_load_and_warm_up(engine: Engine) -> None:
    release = threading.Event()
    calls: list[str] = []

    class Recording(GatedEngine):
        def score(self, *a: Any, **k: Any) -> Any:
            calls.append("score")  # the warm-up forward pass
            return self.real.score(*a, **k)

    def slow_factory(settings: ServerSettings) -> Any:
        assert release.wait(20)
        return Recording(engine, threading.Event())

    async def main() -> None:
        async with running(ServerSettings(), slow_factory, wait_ready=False) as (client, _):
            assert (await client.get("/health")).status_code == 200
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["error"]["code"] == "model_not_ready"
            assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 503
            release.set()
            for _ in range(200):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/ready")).status_code == 200
            assert calls == ["score"]

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_the_model_loads_on_a_thread_that_ends(engine: Engine) -> None:
    """No thread that ran the load outlives it: OpenMP keeps a worker team per thread that ran
    torch ops, and a second live team slows the inference worker (BENCHMARKS.md)."""
    loaders: list[threading.Thread] = []

    def factory(settings: ServerSettings) -> Any:
        loaders.append(threading.current_thread())
        return Shared(engine)

    async def main() -> None:
        async with running(ServerSettings(), factory):
            await _until(lambda: not loaders[0].is_alive())
            assert loaders[0] is not threading.main_thread()

    asyncio.run(main())


def test_load_failure_is_reported(tiny_ckpt: Path) -> None:
    failures: list[BaseException] = []

    def broken(settings: ServerSettings) -> Any:
        raise blipitm.CheckpointError("no such checkpoint: /nowhere")

    async def ready_message(settings: ServerSettings) -> str:
        failures.clear()
        app = create_app(settings, broken, on_load_failure=failures.append)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await _until(lambda: bool(failures))
                r = await client.get("/ready")
                assert r.status_code == 503
                return str(r.json()["error"]["message"])

    # The error names a server path: shown only when the operator asks for paths.
    hidden = asyncio.run(ready_message(ServerSettings()))
    assert "/nowhere" not in hidden and "server log" in hidden
    assert "/nowhere" in asyncio.run(ready_message(ServerSettings(expose_paths=True)))


def test_models_show_no_server_path_unless_asked(engine: Engine, tiny_ckpt: Path) -> None:
    async def models(settings: ServerSettings) -> httpx.Response:
        async with running(settings, lambda s: Shared(engine)) as (client, _):
            r = await client.get("/v1/models")
            assert r.status_code == 200
            return r

    where = str(tiny_ckpt)
    assert Path(where).is_absolute() and engine.info.source.startswith(where)
    r = asyncio.run(models(ServerSettings.of(model=where)))
    assert where not in r.text
    card = r.json()["data"][0]
    assert card["id"] == card["source"] == tiny_ckpt.name
    r = asyncio.run(models(ServerSettings.of(model=where, expose_paths=True)))
    card = r.json()["data"][0]
    assert card["id"] == where and card["source"] == engine.info.source


def test_unexpected_error_is_a_500_envelope_without_internals(engine: Engine) -> None:
    class Broken(GatedEngine):
        def encode_texts(self, texts: list[str]) -> TextFeatures:
            raise RuntimeError("secret detail /srv/internal/path")

    async def main() -> None:
        async with running(ServerSettings(), lambda s: Broken(engine, threading.Event())) as (
            client,
            _,
        ):
            r = await client.post("/v1/embeddings", json={"input": ["x", "y"]})
            assert r.status_code == 500
            assert r.json() == {
                "error": {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
            assert "secret" not in r.text

    asyncio.run(main())


def test_usage_reads_the_engines_counts_without_tokenizing_again(engine: Engine) -> None:
    """usage comes from the token counts the engine's results carry: the request path never
    calls count_tokens (a second tokenization), and the numbers equal what it would say."""

    class NoRecount(Shared):
        def count_tokens(self, texts: Any) -> list[int]:
            raise AssertionError("the request path tokenized the texts a second time")

    texts = ["a red dog", "Two CATS on the grass!", " ".join(["dog"] * 40)]
    image = data_uri(png_bytes((9, 9, 9)))  # a data URI is an image wherever a text may be
    part = {"type": "image_url", "image_url": {"url": image}}
    per_image = engine.info.image_tokens

    def tokens(*t: str) -> int:
        return sum(engine.count_tokens(list(t)))

    requests: list[tuple[str, dict[str, Any], int]] = [
        ("/v1/embeddings", {"input": [texts[0], part, texts[1]]}, tokens(*texts[:2]) + per_image),
        ("/v1/score", {"text_1": image, "text_2": texts}, tokens(*texts) + per_image),
        ("/v1/rerank", {"query": image, "documents": texts}, tokens(*texts) + per_image),
        (
            "/v1/rerank",
            {"query": image, "documents": texts, "rerank_k": 1},
            tokens(*texts) + per_image,
        ),
        (
            "/v2/rerank",
            {"query": texts[2], "documents": [image] * 3},
            tokens(texts[2]) + 3 * per_image,
        ),
        (
            "/v2/rerank",
            {"query": texts[2], "documents": [image] * 3, "rerank_k": 2},
            tokens(texts[2]) + 3 * per_image,
        ),
        (
            "/v2/embed",
            {
                "inputs": [{"content": [{"type": "text", "text": t}]} for t in texts]
                + [{"content": [part]}],
                "input_type": "search_document",
            },
            tokens(*texts) + per_image,
        ),
        (
            "/v1/multimodalembeddings",
            {"inputs": [{"content": [{"type": "text", "text": texts[1]}]}]},
            tokens(texts[1]),
        ),
    ]

    def metered(path: str, answer: dict[str, Any]) -> int:
        if path == "/v2/embed":
            return int(answer["meta"]["billed_units"]["input_tokens"])
        if path == "/v1/multimodalembeddings":
            return int(answer["usage"]["total_tokens"])
        return int(answer["usage"]["prompt_tokens"])

    async def main() -> None:
        async with running(ServerSettings(), lambda s: NoRecount(engine)) as (client, _):
            for path, body, want in requests:
                r = await client.post(path, json=body)
                assert r.status_code == 200, r.text
                assert metered(path, r.json()) == want, (path, body)

    asyncio.run(main())


def test_urls_refused_by_default(engine: Engine) -> None:
    async def main() -> None:
        async with running(ServerSettings(), lambda s: Shared(engine)) as (client, _):
            for url, code in [
                ("http://127.0.0.1:1/a.png", "url_fetch_disabled"),
                ("https://example.com/a.png", "url_fetch_disabled"),
                ("file:///etc/passwd", "url_scheme_not_allowed"),
            ]:
                r = await client.post(
                    "/v1/embeddings", json={"input": ["ok", url], "modality": "image"}
                )
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert (err["code"], err["param"]) == (code, "input[1]")

    asyncio.run(main())


def test_loopback_fetch_needs_the_test_switch(engine: Engine) -> None:
    image = png_bytes((10, 200, 30))
    big = png_bytes((1, 2, 3), size=(300, 300)) + b"\0" * 5000
    routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, image),
        "/hop": (302, {"Location": "/img.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (307, {"Location": "http://10.0.0.1/img.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.png": (200, {"Content-Type": "image/png"}, big),
        "/missing.png": (404, {}, b"nope"),
    }
    base = dict(allow_url_fetch=True, max_image_bytes=4000, url_timeout_s=5)

    async def main(base_url: str) -> None:
        async with running(
            ServerSettings.of(**base, _allow_loopback_for_tests=True), lambda s: Shared(engine)
        ) as (client, _):

            async def embed(path: str) -> httpx.Response:
                return await client.post(
                    "/v1/embeddings",
                    json={"input": [{"type": "image_url", "image_url": {"url": base_url + path}}]},
                )

            for path in ("/img.png", "/hop"):
                r = await embed(path)
                assert r.status_code == 200, r.text
                got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
                np.testing.assert_allclose(got, engine.embed_images(image)[0], atol=1e-5)
            for path, status, code in [
                ("/to-metadata", 400, "url_forbidden"),
                ("/to-private", 400, "url_forbidden"),
                ("/loop", 400, "url_too_many_redirects"),
                ("/big.png", 413, "image_too_large"),
                ("/missing.png", 400, "url_fetch_failed"),
            ]:
                r = await embed(path)
                assert r.status_code == status, (path, r.text)
                assert r.json()["error"]["code"] == code
                assert r.json()["error"]["param"] == "input[0]"
            metrics = (await client.get("/metrics")).text
            assert 'blipitm_image_fetch_failures_total{reason="url_forbidden"} 2.0' in metrics

        # The same server without the switch refuses the loopback image server.
        async with running(ServerSettings.of(**base), lambda s: Shared(engine)) as (client, _):
            r = await client.post(
                "/v1/embeddings",
                json={"input": [base_url + "/img.png"], "modality": "image"},
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "url_forbidden"
            assert "loopback" in r.json()["error"]["message"]

    with image_server(routes) as url:
        asyncio.run(main(url))


def test_default_limits_take_what_openai_clients_send(engine: Engine) -> None:
    """Issue 18 item 9: LangChain sends 1000 texts per request by default and OpenAI accepts 2048,
    so the default --max-items does too; images stay capped by --max-images, which bounds what a
    request holds in memory and costs in encoder time."""
    uri = data_uri(png_bytes((10, 200, 30)))

    async def main() -> None:
        async with running(ServerSettings(), lambda s: Shared(engine)) as (client, _):
            texts = [f"caption {i}" for i in range(2048)]
            r = await client.post("/v1/embeddings", json={"input": texts}, timeout=120)
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 2048
            r = await client.post("/v1/embeddings", json={"input": [*texts, "one more"]})
            assert (r.status_code, r.json()["error"]["param"]) == (413, "input")
        async with running(ServerSettings(max_images=2), lambda s: Shared(engine)) as (client, _):
            r = await client.post("/v2/rerank", json={"query": "a", "documents": [uri] * 2})
            assert r.status_code == 200, r.text
            r = await client.post("/v2/rerank", json={"query": "a", "documents": [uri] * 3})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
            assert r.json()["error"]["param"] == "documents[2]"
            r = await client.post("/v1/rerank", json={"query": uri, "documents": ["a"] * 50})
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_an_app_without_the_gateway_serves_every_model_route(engine: Engine) -> None:
    """The hosted-API gateway (keys, limits, credits, metering, /v1/usage) is one unit on top of
    the request path (issue 19, section 1): built without it, even with keys configured, every
    model route answers, unmetered and open; only the gateway's own route is gone."""
    from fastapi.routing import APIRoute

    from blipitm.server.app import no_extensions
    from blipitm.server.middleware import GuardMiddleware

    uri = data_uri(png_bytes((9, 9, 9)))
    settings = ServerSettings(api_keys=("a-key-nobody-sends",))
    model = settings.model_name
    calls: list[tuple[str, str, dict[str, Any] | None, int]] = [
        ("GET", "/v1/models", None, 200),
        ("GET", f"/v1/models/{model}", None, 200),
        ("POST", "/v1/embeddings", {"input": ["a dog", uri]}, 200),
        ("POST", "/v2/embed", {"texts": ["a dog"], "input_type": "search_query"}, 200),
        (
            "POST",
            "/v1/multimodalembeddings",
            {"inputs": [{"content": [{"type": "image_base64", "image_base64": uri}]}]},
            200,
        ),
        ("POST", "/v1/score", {"text_1": uri, "text_2": ["a dog", "a cat"]}, 200),
        ("POST", "/v1/rerank", {"query": "a dog", "documents": [uri, uri]}, 200),
        ("POST", "/v2/rerank", {"query": "a dog", "documents": [uri, uri]}, 200),
        ("POST", "/v1/explain", {"image": uri, "texts": "a dog", "token_maps": False}, 200),
        ("POST", "/v1/search", {"query": "a dog"}, 404),  # the server's answer: no --index
        # The server's answer: a matching model does not caption (no captioner is served).
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400),
        ("GET", "/v1/usage", None, 404),  # the gateway's route
    ]

    async def main() -> None:
        app = create_app(settings, lambda s: Shared(engine), extensions=no_extensions)
        [guard] = [m for m in app.user_middleware if m.cls is GuardMiddleware]
        model_routes = {
            r.path_format
            for r in guard.kwargs["routes"]  # every route (app.routes nests included routers)
            if isinstance(r, APIRoute) and r.path.startswith(("/v1/", "/v2/"))
        }
        called = {path.replace(model, "{model}") for _, path, _, _ in calls}
        assert len(model_routes) >= 8 and model_routes <= called, model_routes - called
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for _ in range(300):
                    if (await client.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                for method, path, body, status in calls:
                    r = await client.request(method, path, json=body)
                    assert r.status_code == status, (path, r.text)
                    assert "x-ratelimit-limit-requests" not in r.headers
                listed = (await client.get("/v1/models")).json()["data"]
                assert [m["id"] for m in listed] == [model]

    asyncio.run(main())
