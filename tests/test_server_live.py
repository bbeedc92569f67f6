"""A real ``blipitm serve`` process (uvicorn) on 127.0.0.1 with the tiny random checkpoint, driven
by the official OpenAI SDK and httpx: results equal to the Python API, auth, every limit, URL
refusals, batching across requests (seen in /metrics), a bounded load test, a schemathesis run."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import blipitm
from blipitm.engine import Engine
from server_helpers import ServerProcess, bomb_png, cli_server, data_uri, png_bytes

KEY, KEY2 = "test-key-1", "test-key-2"
MODEL = "tiny-blip"
AUTH = {"Authorization": f"Bearer {KEY}"}
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
IMAGES = [png_bytes(c, size=(40 + 7 * i, 30 + 3 * i)) for i, c in enumerate(COLORS)]
URIS = [data_uri(b) for b in IMAGES]
TEXTS = ["a red square", "a green thing on the grass", "blue", "A Yellow. Banana!"]


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    flags = [
        "--api-key", KEY,
        "--api-key", KEY2,
        "--served-model-name", MODEL,
        "--allow-url-fetch",
        "--url-timeout-s", "2",
        "--max-items", "16",
        "--max-text-chars", "300",
        "--max-body-bytes", "3000000",
        "--max-wait-ms", "20",
        "--decode-threads", "2",
    ]  # fmt: skip
    with cli_server(tiny_ckpt, *flags) as s:
        yield s


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    return blipitm.load(tiny_ckpt)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server: ServerProcess, path: str, body: Any, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", AUTH)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["code"], str)
    return dict(body["error"])


# -- startup, models ------------------------------------------------------------------------------


def test_startup_log_names_the_model(server: ServerProcess) -> None:
    out = server.output()
    line = next(ln for ln in out.splitlines() if "serving " in ln)
    for word in ("protocol=blip", "device=cpu", "dtype=float32", "revision=", "overrides=["):
        assert word in line
    assert "text_config.num_attention_heads" in line  # the tiny checkpoint's hub-style heads
    assert KEY not in out and KEY2 not in out  # keys are never logged


def test_models_list(client: openai.OpenAI, engine: Engine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "blipitm"
    assert card["protocol"] == "blip" and card["embedding_dim"] == engine.embedding_dim
    assert card["overrides"] == engine.info.as_dict()["overrides"]
    assert client.models.retrieve(MODEL).id == MODEL


# -- embeddings -----------------------------------------------------------------------------------


def test_text_embeddings_base64_default_and_float(client: openai.OpenAI, engine: Engine) -> None:
    want = engine.embed_texts(TEXTS)
    for fmt in (None, "float"):
        kw = {} if fmt is None else {"encoding_format": fmt}
        res = client.embeddings.create(model=MODEL, input=TEXTS, **kw)  # type: ignore[arg-type]
        got = np.array([d.embedding for d in res.data], dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert [d.index for d in res.data] == [0, 1, 2, 3]
        assert res.model == MODEL
        assert res.usage.prompt_tokens == res.usage.total_tokens > len(TEXTS) * 2
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=256)
    np.testing.assert_allclose(single.data[0].embedding, want[0], atol=1e-5)


def test_base64_is_little_endian_float32(server: ServerProcess, engine: Engine) -> None:
    r = post(server, "/v1/embeddings", {"input": ["a"], "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), engine.embed_texts(["a"])[0], atol=1e-5)


def test_image_embeddings_modality_and_content_parts(client: openai.OpenAI, engine: Engine) -> None:
    want = engine.embed_images(IMAGES)
    bare_b64 = base64.b64encode(IMAGES[3]).decode()
    res = client.embeddings.create(
        model=MODEL, input=[*URIS[:3], bare_b64], extra_body={"modality": "image"}
    )
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in URIS]
    res = client.embeddings.create(model=MODEL, input=parts, encoding_format="float")  # type: ignore[arg-type]
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Texts and images in one request share one space.
    mixed = client.embeddings.create(model=MODEL, input=[TEXTS[0], parts[1]])  # type: ignore[list-item]
    np.testing.assert_allclose(mixed.data[0].embedding, engine.embed_texts(TEXTS[:1])[0], atol=1e-5)
    np.testing.assert_allclose(mixed.data[1].embedding, want[1], atol=1e-5)


def test_embedding_request_errors(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=[[101, 2003, 102]])
    assert "token id" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="x", dimensions=128)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-4", input="x")
    r = post(server, "/v1/embeddings", {"input": "x", "encoding_format": "int8"})
    assert r.status_code == 422 and error(r)["param"] == "encoding_format"


# -- score and rerank -----------------------------------------------------------------------------


def _check_scores(data: list[dict[str, Any]], want: blipitm.PairScores) -> None:
    assert [d["index"] for d in data] == list(range(len(want)))
    assert all(d["object"] == "score" for d in data)
    np.testing.assert_allclose([d["score"] for d in data], want.itm_probability, atol=1e-5)
    np.testing.assert_allclose(
        [d["itm_probability"] for d in data], want.itm_probability, atol=1e-5
    )
    np.testing.assert_allclose([d["itm_logits"] for d in data], want.itm_logits, atol=1e-5)
    np.testing.assert_allclose([d["itc_cosine"] for d in data], want.itc_cosine, atol=1e-5)


def test_score_pairing(server: ServerProcess, engine: Engine) -> None:
    # 1:N, image first.
    r = post(server, "/v1/score", {"model": MODEL, "text_1": URIS[0], "text_2": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("score-")
    _check_scores(body["data"], engine.score(IMAGES[0], TEXTS))
    # 1:N, text first, images as vLLM content parts.
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in URIS]
    r = post(server, "/v1/score", {"text_1": TEXTS[1], "text_2": {"content": parts}})
    _check_scores(r.json()["data"], engine.score(IMAGES, TEXTS[1]))
    # N:N zips.
    r = post(server, "/v1/score", {"text_1": URIS, "text_2": TEXTS})
    _check_scores(r.json()["data"], engine.score(IMAGES, TEXTS))
    # N:1 is an error, as in vLLM; so is text with text.
    r = post(server, "/v1/score", {"text_1": TEXTS, "text_2": URIS[0]})
    assert r.status_code == 400 and error(r)["param"] == "text_2"
    r = post(server, "/v1/score", {"text_1": "a dog", "text_2": ["a cat", URIS[0]]})
    assert r.status_code == 400
    assert (error(r)["param"], error(r)["code"]) == ("text_2[0]", "invalid_pairing")


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_text_query_ranks_images(server: ServerProcess, engine: Engine, path: str) -> None:
    want = {r.index: r for r in engine.rank_images(TEXTS[0], IMAGES, rerank_k=None)}
    docs = [URIS[0], {"type": "image_url", "image_url": {"url": URIS[1]}}, *URIS[2:]]
    r = post(server, path, {"model": MODEL, "query": TEXTS[0], "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    best = sorted(want.values(), key=lambda x: -x.itm_probability)[:3]
    assert [x["index"] for x in results] == [b.index for b in best]
    for x in results:
        assert abs(x["relevance_score"] - want[x["index"]].itm_probability) < 1e-5
        assert abs(x["itc_cosine"] - want[x["index"]].itc_cosine) < 1e-5
        assert "document" not in x  # no image is sent back unless asked for


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_documents_follow_each_apis_defaults(server: ServerProcess, path: str) -> None:
    """Issue 18 item 9. Unasked, /v1 (Cohere v1 / Jina) returns text documents and /v2 (Cohere
    v2) none; images come back only when asked, never as base64 by default. A returned document
    is {"text": ...} (what Cohere's SDK and litellm parse), the text or image as sent."""
    v1 = path == "/v1/rerank"
    docs = [URIS[0], {"image": URIS[1]}, {"type": "image_url", "image_url": {"url": URIS[2]}}]
    for asked in (None, False, True):
        extra = {} if asked is None else {"return_documents": asked}
        r = post(server, path, {"query": TEXTS[0], "documents": docs, **extra})
        assert r.status_code == 200, r.text
        for x in r.json()["results"]:
            if asked:
                assert x["document"] == {"text": URIS[x["index"]]}
            else:
                assert "document" not in x and URIS[x["index"]][30:90] not in r.text
        r = post(
            server, path, {"query": URIS[0], "documents": [TEXTS[1], {"text": TEXTS[2]}], **extra}
        )
        assert r.status_code == 200, r.text
        for x in r.json()["results"]:
            if asked or (asked is None and v1):
                assert x["document"] == {"text": TEXTS[1 + x["index"]]}
            else:
                assert "document" not in x


@pytest.mark.parametrize("provider", ["cohere", "cohere-v1", "jina_ai"])
def test_litellm_rerank_text_query_ranks_images(
    server: ServerProcess, engine: Engine, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """litellm's cohere (v2, or v1 when the base ends in /v1/rerank) and jina_ai providers parse a
    text-to-images rerank: each result's document is {"text": ...} (litellm asks for documents by
    default, so images come back as sent); with return_documents=False none do."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else it fetches one at import
    import litellm

    want = {r.index: r for r in engine.rank_images(TEXTS[0], IMAGES, rerank_k=None)}
    name, base = provider.removesuffix("-v1"), server.url
    if provider.endswith("-v1"):
        base += "/v1/rerank"
    kw: dict[str, Any] = {"model": f"{name}/{MODEL}", "api_base": base, "api_key": KEY}
    r = litellm.rerank(query=TEXTS[0], documents=URIS, top_n=2, **kw)
    assert r.results is not None and len(r.results) == 2
    for x in r.results:
        assert abs(x["relevance_score"] - want[x["index"]].itm_probability) < 1e-5
        assert x["document"]["text"] == URIS[x["index"]]
    r = litellm.rerank(query=TEXTS[0], documents=URIS, return_documents=False, **kw)
    assert r.results is not None and all("document" not in x for x in r.results)


def test_cohere_sdk_rerank_v1_and_v2(server: ServerProcess, engine: Engine) -> None:
    """Cohere's own SDK: v1 with document objects and rank_fields, v2 with strings."""
    import cohere

    want = {r.index: r for r in engine.rank_texts(IMAGES[0], TEXTS, rerank_k=None)}
    v1 = cohere.Client(api_key=KEY, base_url=server.url)
    docs = [{"caption": t, "id": str(i)} for i, t in enumerate(TEXTS)]
    r1 = v1.rerank(
        model=MODEL, query=URIS[0], documents=docs, rank_fields=["caption"], return_documents=True
    )
    for x in r1.results:
        assert abs(x.relevance_score - want[x.index].itm_probability) < 1e-5
        assert x.document is not None and x.document.text == TEXTS[x.index]
    v2 = cohere.ClientV2(api_key=KEY, base_url=server.url)
    r2 = v2.rerank(model=MODEL, query=TEXTS[0], documents=URIS, top_n=3)
    want = {r.index: r for r in engine.rank_images(TEXTS[0], IMAGES, rerank_k=None)}
    assert len(r2.results) == 3
    for y in r2.results:
        assert abs(y.relevance_score - want[y.index].itm_probability) < 1e-5


def test_rerank_rank_fields_of_cohere_document_objects(
    server: ServerProcess, engine: Engine
) -> None:
    """Cohere v1's structured documents: ``rank_fields`` names the fields ranked (their values
    joined in order), ``text`` is the default; a document's fields all come back."""
    docs = [{"title": "a red", "body": "square"}, {"title": "blue", "text": "x", "id": "7"}]
    body = {"query": URIS[0], "documents": docs, "rank_fields": ["title", "body"]}
    r = post(server, "/v1/rerank", body | {"return_documents": True})
    assert r.status_code == 200, r.text
    want = {
        x.index: x for x in engine.rank_texts(IMAGES[0], ["a red square", "blue"], rerank_k=None)
    }
    got = {x["index"]: x for x in r.json()["results"]}
    for i, x in got.items():
        assert abs(x["relevance_score"] - want[i].itm_probability) < 1e-5
    assert got[0]["document"] == {"text": "a red square", **docs[0]}
    assert got[1]["document"] == docs[1]
    r = post(server, "/v1/rerank", {"query": URIS[0], "documents": docs})  # default: text
    assert r.status_code == 400 and error(r)["param"] == "documents[0]"
    r = post(server, "/v1/rerank", {"query": URIS[0], "documents": docs[1:]})
    assert r.status_code == 200, r.text
    want_x = engine.rank_texts(IMAGES[0], ["x"], rerank_k=None)[0].itm_probability
    assert abs(r.json()["results"][0]["relevance_score"] - want_x) < 1e-5


def test_rerank_image_query_ranks_texts(server: ServerProcess, engine: Engine) -> None:
    want = {r.index: r for r in engine.rank_texts(IMAGES[2], TEXTS, rerank_k=None)}
    docs = [TEXTS[0], {"text": TEXTS[1]}, *TEXTS[2:]]
    r = post(server, "/v1/rerank", {"query": URIS[2], "documents": docs, "return_documents": False})
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2, 3]
    assert all("document" not in x for x in results)
    for x in results:
        assert abs(x["relevance_score"] - want[x["index"]].itm_probability) < 1e-5
    # rerank_k: only the 2 best by ITC cosine get the ITM pass.
    kept = engine.rank_texts(IMAGES[2], TEXTS, rerank_k=2)
    r = post(server, "/v1/rerank", {"query": URIS[2], "documents": TEXTS, "rerank_k": 2})
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == sorted(k.index for k in kept)
    assert results[0]["document"] == {"text": TEXTS[results[0]["index"]]}
    r = post(server, "/v1/rerank", {"query": "text", "documents": [URIS[0], "a caption"]})
    assert r.status_code == 400 and error(r)["param"] == "documents[1]"


# -- auth -----------------------------------------------------------------------------------------


def test_auth(server: ServerProcess) -> None:
    body = {"input": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(server, "/v1/embeddings", body, headers=headers)
        assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert post(server, "/v2/rerank", {}, headers={}).status_code == 401
    ok = post(server, "/v1/embeddings", body, headers={"Authorization": f"Bearer {KEY2}"})
    assert ok.status_code == 200
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + open_path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


# -- limits ---------------------------------------------------------------------------------------


def test_body_limit_from_content_length_and_while_streaming(server: ServerProcess) -> None:
    big = {"input": ["x" * 100] * 40_000}  # ~4.5 MB > 3 MB
    r = post(server, "/v1/embeddings", big)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"input": ["'
        for _ in range(40):
            yield b"y" * 100_000
        yield b'"]}'

    r = httpx.post(
        server.url + "/v1/embeddings",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"


def test_item_pixel_text_and_media_limits(server: ServerProcess) -> None:
    r = post(server, "/v1/embeddings", {"input": ["t"] * 17})
    assert r.status_code == 413 and error(r)["param"] == "input"
    r = post(server, "/v1/rerank", {"query": "q", "documents": [URIS[0]] * 17})
    assert r.status_code == 413 and error(r)["param"] == "documents"
    bomb = data_uri(bomb_png(8000, 8000))  # 64 Mpx > the 40 Mpx default, a ~70 KB file
    r = post(server, "/v1/embeddings", {"input": [URIS[0], bomb], "modality": "image"})
    assert r.status_code == 413
    assert (error(r)["param"], error(r)["code"]) == ("input[1]", "image_too_large")
    r = post(server, "/v1/score", {"text_1": URIS[0], "text_2": ["fine", "z" * 301]})
    assert r.status_code == 400 and error(r)["param"] == "text_2[1]"
    plain = "data:text/plain;base64,aGVsbG8="
    r = post(server, "/v1/embeddings", {"input": [plain], "modality": "image"})
    assert r.status_code == 415 and error(r)["param"] == "input[0]"
    r = post(server, "/v1/embeddings", {"input": ["not base64 !!"], "modality": "image"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_image"
    r = post(server, "/v1/embeddings", {"input": [data_uri(b"GIF89a broken")]})
    assert r.status_code == 400 and error(r)["param"] == "input[0]"
    r = httpx.post(server.url + "/v1/embeddings", content=b"input=x", headers=AUTH)
    assert r.status_code == 415
    r = httpx.post(
        server.url + "/v1/embeddings",
        content=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and error(r)["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:9/a.png", "url_forbidden"),
        ("http://10.1.2.3/a.png", "url_forbidden"),
        ("http://169.254.169.254/latest/meta-data/", "url_forbidden"),
        ("http://[::1]:9/a.png", "url_forbidden"),
        ("http://[::ffff:127.0.0.1]:9/a.png", "url_forbidden"),
        ("http://localhost:9/a.png", "url_forbidden"),
        ("file:///etc/passwd", "url_scheme_not_allowed"),
    ],
)
def test_url_fetch_refuses_internal_targets(server: ServerProcess, url: str, code: str) -> None:
    r = post(server, "/v1/embeddings", {"input": [url], "modality": "image"})
    assert r.status_code == 400
    assert (error(r)["code"], error(r)["param"]) == (code, "input[0]")


# -- batching and load ----------------------------------------------------------------------------


def _histogram(metrics: str, name: str) -> tuple[float, float]:
    """(count, count of observations <= 1) of a histogram in Prometheus text, summed over its
    labels (the served models)."""
    count = sum(float(v) for v in re.findall(rf"^{name}_count{{[^}}]*}} (\S+)$", metrics, re.M))
    le1 = sum(
        float(v) for v in re.findall(rf'^{name}_bucket{{[^}}]*le="1.0"}} (\S+)$', metrics, re.M)
    )
    return count, le1


def test_concurrent_requests_are_batched(server: ServerProcess) -> None:
    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            bodies = [{"input": [f"caption number {i}"]} for i in range(24)]
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))
            return [r.status_code for r in rs]

    before = _histogram(httpx.get(server.url + "/metrics").text, "blipitm_batch_size")
    assert set(asyncio.run(main())) == {200}
    count, le1 = _histogram(httpx.get(server.url + "/metrics").text, "blipitm_batch_size")
    batches, singles = count - before[0], le1 - before[1]
    assert batches < 24  # 24 requests took fewer worker batches ...
    assert batches - singles >= 1  # ... so at least one batch merged several requests


def test_load_many_concurrent_clients(server: ServerProcess) -> None:
    bodies: list[tuple[str, dict[str, Any]]] = []
    for i in range(200):
        kind = i % 4
        if kind == 0:
            bodies.append(("/v1/embeddings", {"input": [f"text {i}", "another"]}))
        elif kind == 1:
            bodies.append(("/v1/embeddings", {"input": [URIS[i % 4]], "modality": "image"}))
        elif kind == 2:
            bodies.append(("/v1/score", {"text_1": URIS[i % 4], "text_2": TEXTS[: 1 + i % 4]}))
        else:
            bodies.append(("/v2/rerank", {"query": f"query {i}", "documents": URIS}))

    async def main() -> list[int]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)
        statuses: list[int] = []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(
            base_url=server.url, headers=AUTH, timeout=60, limits=limits
        ) as c:

            async def worker() -> None:
                while not queue.empty():
                    path, body = queue.get_nowait()
                    statuses.append((await c.post(path, json=body)).status_code)

            await asyncio.gather(*(worker() for _ in range(32)))
        return statuses

    statuses = asyncio.run(main())
    assert len(statuses) == 200  # every request answered
    assert all(s < 500 for s in statuses)
    assert statuses.count(200) == 200  # the default queue (256) never fills with 32 clients


# -- schemathesis ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


# Schemathesis' pytest plugin does not run under this pytest version, so each operation is driven
# through its Hypothesis strategy directly (same generation and checks).
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v2/embed"),
    ("POST", "/v1/multimodalembeddings"),
    ("POST", "/v1/score"),
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/v1/search"),  # this server has no --index: 404 in the documented envelope
    ("GET", "/v1/usage"),  # operator keys only here: 400 not_a_metered_key
    ("POST", "/v1/explain"),
    ("POST", "/v1/chat/completions"),  # a matching model only here: 400 unsupported_model
]


def test_operations_list_covers_the_spec(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    listed = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert listed == set(OPERATIONS)


# Semantic 400s for schema-valid bodies (a random string is not an image) are the API's design, so
# "positive data accepted" is not checked; server errors and schema conformance are.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    # Negative (schema-violating) bodies only where there is a body to violate.
    (m, p, GenerationMode.NEGATIVE)
    for m, p in OPERATIONS
    if m == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_openapi_conformance(api_schema: Any, method: str, path: str, mode: Any) -> None:
    """No 5xx, and every response (errors included) matches the documented schema."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25 if mode == GenerationMode.POSITIVE else 10,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers=AUTH, timeout=60, checks=CHECKS)

    run()


# -- bad text: empty strings, lone surrogates -----------------------------------------------------


def test_empty_text_is_a_400_naming_the_item(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=["a dog", ""])
    assert info.value.body["param"] == "input[1]"  # type: ignore[index]
    for path, body, param in [
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/score", {"text_1": URIS[0], "text_2": ["a dog", ""]}, "text_2[1]"),
        ("/v1/rerank", {"query": "", "documents": URIS[:2]}, "query"),
        ("/v2/rerank", {"query": URIS[0], "documents": [{"text": ""}]}, "documents[0]"),
    ]:
        r = post(server, path, body)
        assert r.status_code == 400, (path, r.text)
        assert (error(r)["code"], error(r)["param"]) == ("invalid_input", param)


SURROGATE = "a\ud800b"  # valid JSON ("a\\ud800b"), not Unicode text


def _schema(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _minimal(spec: dict[str, Any], node: dict[str, Any]) -> Any:
    """The smallest value the schema accepts (required fields only, first branch of a union)."""
    node = _schema(spec, node)
    if "const" in node or "enum" in node:
        return node.get("const", (node.get("enum") or [None])[0])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return _minimal(spec, node[key][0])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        return {k: _minimal(spec, props[k]) for k in node.get("required", [])}
    if kind == "array":
        return [_minimal(spec, node["items"])]
    return {"string": "x", "integer": 1, "number": 1.0, "boolean": True}.get(kind)


def _with_surrogate(spec: dict[str, Any], node: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """(where, value) for every string the schema can hold, in every union branch: a minimal value
    with SURROGATE in that one string. New fields and shapes are covered without a test change."""
    node = _schema(spec, node)
    out: list[tuple[str, Any]] = []
    for key in ("anyOf", "oneOf"):
        for branch in node.get(key, []):
            out += _with_surrogate(spec, branch, path)
    kind = node.get("type")
    if kind == "string":
        out.append((path, SURROGATE))
    elif kind == "object":
        base = _minimal(spec, node)
        for name, prop in node.get("properties", {}).items():
            where = f"{path}.{name}" if path else name
            out += [(w, {**base, name: v}) for w, v in _with_surrogate(spec, prop, where)]
    elif kind == "array":
        out += [(w, [v]) for w, v in _with_surrogate(spec, node["items"], f"{path}[0]")]
    return out


def test_lone_surrogate_in_any_string_field_is_a_400(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    cases = []
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                cases += [(path, *case) for case in _with_surrogate(spec, body["schema"], "")]
    assert {p for p, _, _ in cases} == {p for m, p in OPERATIONS if m == "POST"}
    assert len(cases) > 40
    headers = {**AUTH, "Content-Type": "application/json"}
    for path, where, body in cases:
        # json.dumps escapes the surrogate as \ud800 (httpx's json= cannot encode it at all).
        r = httpx.post(server.url + path, content=json.dumps(body), headers=headers, timeout=60)
        assert r.status_code == 400, (path, where, r.status_code, r.text)
        assert (error(r)["code"], error(r)["param"]) == ("invalid_unicode", where), (path, r.text)
    # A surrogate in a key is refused too, one in a GET path is a plain 404; a pair is text.
    r = httpx.post(
        server.url + "/v1/embeddings", content='{"input": "x", "\\udfff": 1}', headers=headers
    )
    assert r.status_code == 400 and error(r)["code"] == "invalid_unicode"
    r = httpx.get(server.url + "/v1/models/%ED%A0%80", headers=AUTH)
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    r = httpx.post(
        server.url + "/v1/embeddings",
        content='{"input": ["a dog \\ud83d\\udc36"]}',
        headers=headers,
    )
    assert r.status_code == 200, r.text


# -- metrics by route template --------------------------------------------------------------------


def _request_counts(server: ServerProcess) -> dict[tuple[str, str], float]:
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(
        r'^blipitm_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)$', text, re.M
    )
    return {(route, status): float(n) for route, status, n in found}


def test_metrics_label_each_request_by_its_route_template(server: ServerProcess) -> None:
    calls = [
        ("GET", "/health", None, 200, "/health"),
        ("GET", "/ready", None, 200, "/ready"),
        ("GET", "/v1/models", None, 200, "/v1/models"),
        ("GET", f"/v1/models/{MODEL}", None, 200, "/v1/models/{model}"),
        ("GET", "/v1/models/no-such-model", None, 404, "/v1/models/{model}"),
        ("POST", "/v1/embeddings", {"input": "a dog"}, 200, "/v1/embeddings"),
        ("POST", "/v1/score", {"text_1": URIS[0], "text_2": "a dog"}, 200, "/v1/score"),
        ("POST", "/v1/rerank", {"query": "a dog", "documents": URIS[:1]}, 200, "/v1/rerank"),
        ("POST", "/v2/rerank", {"query": "a dog", "documents": URIS[:1]}, 200, "/v2/rerank"),
        ("POST", "/v1/search", {"query": "a dog"}, 404, "/v1/search"),
        ("GET", "/openapi.json", None, 200, "/openapi.json"),
        ("GET", "/docs", None, 200, "/docs"),
        ("GET", "/docs/assets/swagger-ui.css", None, 200, "/docs/assets/{name}"),
        ("GET", "/v1/embeddings", None, 405, "/v1/embeddings"),  # right path, wrong method
        ("GET", "/no/such/path/12345", None, 404, "other"),  # raw paths never become labels
    ]
    before = _request_counts(server)
    for method, path, body, status, _ in calls:
        r = httpx.request(method, server.url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == status, (path, r.text)
    r = post(server, "/v1/score", {}, headers={})  # refused by auth before routing: still labelled
    assert r.status_code == 401
    r = httpx.get(server.url + "/metrics")  # this scrape itself is counted once it has answered
    after = _request_counts(server)
    want: dict[tuple[str, str], float] = {("/v1/score", "401"): 1, ("/metrics", "200"): 2}
    for _, _, _, status, label in calls:
        want[(label, str(status))] = want.get((label, str(status)), 0) + 1
    got = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert got == want
    assert not any("12345" in route for route, _ in after)


# -- paths, docs, Jina's rerank shape, usage ------------------------------------------------------


def test_models_show_no_server_path(server: ServerProcess, tiny_ckpt: Path) -> None:
    for path in ("/v1/models", f"/v1/models/{MODEL}"):
        r = httpx.get(server.url + path, headers=AUTH)
        assert r.status_code == 200
        assert str(tiny_ckpt) not in r.text and str(tiny_ckpt.parent) not in r.text
    card = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert card["source"] == tiny_ckpt.name


def test_docs_page_loads_its_assets_from_this_server(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
    assert sorted(refs) == sorted(
        [
            "/docs/assets/swagger-ui-bundle.js",
            "/docs/assets/swagger-ui.css",
            "/docs/assets/favicon-32x32.png",
            "/openapi.json",
        ]
    )
    assert '"validatorUrl": null' in r.text  # Swagger UI would otherwise call validator.swagger.io
    for ref in refs:
        asset = httpx.get(server.url + ref)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    js = httpx.get(server.url + "/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("application/javascript")
    assert b"SwaggerUIBundle" in js.content
    assert httpx.get(server.url + "/docs/assets/../../etc/passwd").status_code == 404


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_accepts_jinas_multimodal_shape(
    server: ServerProcess, engine: Engine, path: str
) -> None:
    want = {r.index: r for r in engine.rank_images(TEXTS[0], IMAGES, rerank_k=None)}
    bare = base64.b64encode(IMAGES[3]).decode()
    docs = [{"image": URIS[0]}, {"image": URIS[1]}, {"image": URIS[2]}, {"image": bare}]
    for query in (TEXTS[0], {"text": TEXTS[0]}):
        r = post(server, path, {"query": query, "documents": docs})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert sorted(x["index"] for x in results) == [0, 1, 2, 3]
        for x in results:
            assert abs(x["relevance_score"] - want[x["index"]].itm_probability) < 1e-5
    want = {r.index: r for r in engine.rank_texts(IMAGES[1], TEXTS, rerank_k=None)}
    r = post(server, path, {"query": {"image": URIS[1]}, "documents": [{"text": t} for t in TEXTS]})
    assert r.status_code == 200, r.text
    for x in r.json()["results"]:
        assert abs(x["relevance_score"] - want[x["index"]].itm_probability) < 1e-5
        if path == "/v1/rerank":  # Jina's default: documents returned; Cohere v2's: none
            assert x["document"] == {"text": TEXTS[x["index"]]}
        else:
            assert "document" not in x
    r = post(server, path, {"query": {"image": URIS[1]}, "documents": [{"image": URIS[0]}]})
    assert r.status_code == 400 and error(r)["param"] == "documents[0]"


def test_usage_counts_exact_tokens(server: ServerProcess, tiny_ckpt: Path) -> None:
    # docs/server.md: text tokens as the model reads them ([ENC]/[CLS] and [SEP] included, BLIP
    # cleanup keeps 30 words), plus patches + CLS per image. Every word here is one vocabulary
    # token of the test vocabulary (blipitm.testing.vocab), so the counts are by hand:
    texts = {
        "a red dog": 3 + 2,
        "Two CATS on the grass!": 5 + 2,  # lowercased, "!" dropped
        "A Yellow. Bus": 3 + 2,
        " ".join(["dog"] * 40): 30 + 2,  # the first 30 words
    }
    vision = json.loads((tiny_ckpt / "config.json").read_text())["vision_config"]
    per_image = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    text_tokens = sum(texts.values())

    r = post(server, "/v1/embeddings", {"input": list(texts)})
    assert r.json()["usage"] == {"prompt_tokens": text_tokens, "total_tokens": text_tokens}
    r = post(server, "/v1/embeddings", {"input": URIS[:3], "modality": "image"})
    assert r.json()["usage"]["prompt_tokens"] == 3 * per_image
    r = post(server, "/v1/score", {"text_1": URIS[0], "text_2": list(texts)})
    usage = r.json()["usage"]
    assert usage == {
        "prompt_tokens": text_tokens + per_image,
        "total_tokens": text_tokens + per_image,
        "completion_tokens": 0,
    }
    r = post(server, "/v2/rerank", {"query": "a red dog", "documents": URIS})
    assert r.json()["usage"]["prompt_tokens"] == 5 + len(URIS) * per_image
    r = post(server, "/v1/rerank", {"query": URIS[1], "documents": list(texts)})
    assert r.json()["usage"]["prompt_tokens"] == text_tokens + per_image
