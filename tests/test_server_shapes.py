"""Cohere's ``/v2/embed`` and Voyage's ``/v1/multimodalembeddings`` on a real ``blipitm serve``
(tiny random checkpoint), driven by the stock ``cohere`` and ``voyageai`` SDKs and httpx: vectors
equal to the Python API's, every integer embedding type against a reference written here, every
field's refusals, URL fetching off as on /v1/embeddings, and a metered key billed for both."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
import voyageai
import voyageai.error
from PIL import Image

import blipitm
from blipitm.engine import Engine
from blipitm.keys import KeyStore
from blipitm.server.quantize import quantize
from server_helpers import ServerProcess, cli_server, data_uri, png_bytes

OPERATOR = "shapes-operator-key"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
MODEL = "tiny-blip"
MAX_ITEMS, MAX_IMAGES, IMAGE_CREDITS = 8, 4, 3
TEXTS = ["a red square", "a green thing on the grass", "blue", "A Yellow. Banana!"]
IMAGES = [png_bytes(c, size=(40 + 5 * i, 30)) for i, c in enumerate([(200, 30, 30), (30, 200, 30)])]
URIS = [data_uri(b) for b in IMAGES]
INTEGER_TYPES = ("int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("shape-keys") / "keys.db")


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, store: KeyStore) -> Iterator[ServerProcess]:
    flags = [
        "--keys-db",
        str(store.path),
        "--api-key",
        OPERATOR,
        "--served-model-name",
        MODEL,
        "--max-items",
        str(MAX_ITEMS),
        "--max-images",
        str(MAX_IMAGES),
        "--image-credits",
        str(IMAGE_CREDITS),
        "--max-wait-ms",
        "2",
    ]  # fmt: skip  (no --allow-url-fetch: image URLs are refused)
    with cli_server(tiny_ckpt, *flags) as s:
        yield s


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    return blipitm.load(tiny_ckpt)


def post(server: ServerProcess, path: str, body: Any, key: str = OPERATOR) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"}
    return httpx.post(server.url + path, json=body, headers=auth, timeout=60)


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- the integer types, by a reference written independently of blipitm.server.quantize ----------


def ref_uint8(vector: list[float]) -> list[int]:
    """Each component from [-1, 1] onto 0..255: round((x + 1) * 127.5), ties to even (Python's
    round), clamped."""
    return [min(255, max(0, round((float(x) + 1.0) * 127.5))) for x in vector]


def ref_int8(vector: list[float]) -> list[int]:
    return [u - 128 for u in ref_uint8(vector)]


def ref_ubinary(vector: list[float]) -> list[int]:
    """Sign bits (x > 0 is 1), 8 to a byte, the first component in the most significant bit."""
    out = []
    for start in range(0, len(vector), 8):
        byte = 0
        for x in vector[start : start + 8]:
            byte = byte * 2 + (1 if x > 0 else 0)
        out.append(byte)
    return out


def ref_binary(vector: list[float]) -> list[int]:
    return [b - 128 for b in ref_ubinary(vector)]


REFERENCE = {"int8": ref_int8, "uint8": ref_uint8, "binary": ref_binary, "ubinary": ref_ubinary}


def test_reference_on_hand_picked_values() -> None:
    values = [-1.0, 1.0, 0.0, 1e-9, -1e-9, 1.5, -2.0, 0.5]
    assert ref_uint8(values) == [0, 255, 128, 128, 127, 255, 0, 191]
    assert ref_int8(values) == [-128, 127, 0, 0, -1, 127, -128, 63]
    assert ref_ubinary(values) == [0b01010101]
    assert ref_ubinary([1.0] * 8 + [-1.0] * 7 + [0.3]) == [255, 1]
    assert ref_binary([1.0] * 8 + [-1.0] * 8) == [127, -128]


def test_quantize_equals_the_reference() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[0, :8] = [0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, -0.5]
    for kind, ref in REFERENCE.items():
        got = quantize(vectors, kind)
        assert got.dtype == (np.uint8 if kind.startswith("u") else np.int8), kind
        assert got.tolist() == [ref(v) for v in vectors.tolist()], kind
    assert quantize(vectors, "ubinary").shape == (5, 32)
    np.testing.assert_array_equal(quantize(vectors, "float"), vectors)


# -- Cohere /v2/embed -----------------------------------------------------------------------------


def test_cohere_sdk_embeds_texts_in_every_type(server: ServerProcess, engine: Engine) -> None:
    client = cohere.ClientV2(api_key=OPERATOR, base_url=server.url)
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    res = client.embed(
        model=MODEL, texts=TEXTS, input_type="search_document", embedding_types=types
    )
    assert res.response_type == "embeddings_by_type" and res.id and res.texts == TEXTS
    floats = res.embeddings.float_
    assert floats is not None
    np.testing.assert_allclose(np.array(floats), engine.embed_texts(TEXTS), atol=1e-6, rtol=0)
    for kind, ref in REFERENCE.items():
        assert getattr(res.embeddings, kind) == [ref(v) for v in floats], kind
    assert len(res.embeddings.ubinary[0]) == engine.embedding_dim // 8  # type: ignore[index]
    assert res.embeddings.base64 is not None
    decoded = [np.frombuffer(base64.b64decode(b), "<f4") for b in res.embeddings.base64]
    np.testing.assert_array_equal(np.array(decoded), np.array(floats, dtype=np.float32))
    assert res.meta is not None and res.meta.api_version is not None
    assert res.meta.api_version.version == "2"
    units = res.meta.billed_units
    assert units is not None and units.images == 0
    assert units.input_tokens == units.text_tokens == sum(engine.count_tokens(TEXTS))
    # Default: float only; input_type changes nothing.
    again = client.embed(model=MODEL, texts=TEXTS[:1], input_type="search_query")
    assert again.embeddings.int8 is None and again.embeddings.float_ is not None
    np.testing.assert_allclose(again.embeddings.float_, floats[:1], atol=1e-6, rtol=0)


def test_cohere_images_and_single_part_inputs(server: ServerProcess, engine: Engine) -> None:
    client = cohere.ClientV2(api_key=OPERATOR, base_url=server.url)
    want = engine.embed_images(IMAGES)
    res = client.embed(model=MODEL, images=URIS, input_type="image", embedding_types=["float"])
    np.testing.assert_allclose(np.array(res.embeddings.float_), want, atol=1e-6, rtol=0)
    assert res.texts is None and res.meta is not None and res.meta.billed_units is not None
    assert res.meta.billed_units.images == 2
    assert res.meta.billed_units.image_tokens == 2 * engine.info.image_tokens
    inputs: list[Any] = [
        {"content": [{"type": "text", "text": TEXTS[1]}]},
        {"content": [{"type": "image_url", "image_url": {"url": URIS[0]}}]},
    ]
    res = client.embed(
        model=MODEL, inputs=inputs, input_type="search_document", embedding_types=["ubinary"]
    )
    assert res.embeddings.float_ is None
    # image_url as the bare reference (Cohere's API takes both); texts and images share a space.
    inputs[1] = {"content": [{"type": "image_url", "image_url": URIS[1]}]}
    r = post(server, "/v2/embed", {"inputs": inputs, "input_type": "clustering"})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"]["float"])
    np.testing.assert_allclose(got[0], engine.embed_texts([TEXTS[1]])[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6, rtol=0)


# -- Voyage /v1/multimodalembeddings --------------------------------------------------------------


def test_voyage_sdk_multimodal_embed(server: ServerProcess, engine: Engine) -> None:
    client = voyageai.Client(api_key=OPERATOR, base_url=server.url + "/v1")
    picture = Image.new("RGB", (37, 29), (20, 120, 220))  # the SDK sends it as lossless WebP
    res = client.multimodal_embed(
        inputs=[[TEXTS[0]], [picture], [TEXTS[2]]], model=MODEL, input_type="document"
    )
    got = np.array(res.embeddings)
    np.testing.assert_allclose(got[[0, 2]], engine.embed_texts([TEXTS[0], TEXTS[2]]), atol=1e-6)
    np.testing.assert_allclose(got[1], engine.embed_images([picture])[0], atol=1e-6, rtol=0)
    tokens = sum(engine.count_tokens([TEXTS[0], TEXTS[2]]))
    size = engine.config.vision.image_size
    assert (res.text_tokens, res.image_pixels) == (tokens, size * size)
    assert res.total_tokens == tokens + engine.info.image_tokens
    floats = res.embeddings
    # Integer types: the SDK asks for base64 and decodes each type's bytes itself.
    for kind, ref in REFERENCE.items():
        out = client.multimodal_embed(
            inputs=[[TEXTS[0]], [picture], [TEXTS[2]]], model=MODEL, output_dtype=kind
        )
        assert out.embeddings == [ref(v) for v in floats], kind


def test_voyage_documented_json(server: ServerProcess, engine: Engine) -> None:
    inputs = [
        {"content": [{"type": "image_base64", "image_base64": URIS[0]}]},
        {"content": [{"type": "text", "text": TEXTS[3]}]},
    ]
    r = post(server, "/v1/multimodalembeddings", {"inputs": inputs, "model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert set(body["usage"]) == {"text_tokens", "image_pixels", "video_pixels", "total_tokens"}
    np.testing.assert_allclose(body["data"][0]["embedding"], engine.embed_images(IMAGES[:1])[0])
    r = post(
        server,
        "/v1/multimodalembeddings",
        {"inputs": inputs, "output_encoding": "base64", "truncation": False, "input_type": None},
    )
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
    np.testing.assert_array_equal(np.array(raw), np.array([d["embedding"] for d in body["data"]]))
    r = post(
        server,
        "/v1/multimodalembeddings",
        {"inputs": inputs, "output_dtype": "int8", "output_encoding": "base64"},
    )
    raw8 = [
        np.frombuffer(base64.b64decode(d["embedding"]), np.int8).tolist() for d in r.json()["data"]
    ]
    assert raw8 == [ref_int8(d["embedding"]) for d in body["data"]]


def test_voyage_sdk_reports_a_refusal(server: ServerProcess) -> None:
    client = voyageai.Client(api_key=OPERATOR, base_url=server.url + "/v1")
    with pytest.raises(voyageai.error.VoyageError) as info:
        client.multimodal_embed(inputs=[[TEXTS[0], TEXTS[1]]], model=MODEL)
    assert "inputs[0].content" in str(info.value) and info.value.http_status == 400


# -- refusals -------------------------------------------------------------------------------------

E, M = "/v2/embed", "/v1/multimodalembeddings"
DOC = {"input_type": "search_document"}
SCHEMA, INPUT, UNSUPPORTED = "invalid_request", "invalid_input", "unsupported_input"  # codes


def embed(**fields: Any) -> dict[str, Any]:
    """A /v2/embed body: ``fields`` over texts=["a"] and input_type (None drops a field)."""
    body = {"texts": ["a"], **DOC, **fields}
    return {k: v for k, v in body.items() if v is not None}


def one(part: Any) -> dict[str, Any]:
    return {"content": [part]}


def _text(t: Any) -> dict[str, Any]:
    return one({"type": "text", "text": t})


def _image(uri: str) -> dict[str, Any]:
    return one({"type": "image_base64", "image_base64": uri})


def _url(value: Any) -> dict[str, Any]:
    return one({"type": "image_url", "image_url": value})


MIXED = {
    "content": [{"type": "text", "text": "a dog"}, {"type": "image_url", "image_url": URIS[0]}]
}
BROKEN = data_uri(b"GIF89a broken")
OVER, OVER_IMAGES = MAX_ITEMS + 1, MAX_IMAGES + 1
LAST = MAX_IMAGES  # the first image over --max-images
MANY = "too_many_items"
BAD = [
    # Cohere: types and enums (422 from the schema), then the route's own checks.
    (E, embed(texts="a dog"), 422, SCHEMA, "texts"),
    (E, embed(texts=["a dog", 5]), 422, SCHEMA, "texts[1]"),
    (E, embed(embedding_types=["float", "fp16"]), 422, SCHEMA, "embedding_types[1]"),
    (E, embed(embedding_types="float"), 422, SCHEMA, "embedding_types"),
    (E, embed(input_type="query"), 422, SCHEMA, "input_type"),
    (E, embed(input_type=None), 422, SCHEMA, "input_type"),
    (E, embed(truncate="MIDDLE"), 422, SCHEMA, "truncate"),
    (E, embed(truncate="START"), 400, UNSUPPORTED, "truncate"),
    (E, embed(max_tokens=8), 400, INPUT, "max_tokens"),
    (E, embed(output_dimension=128), 400, "unsupported_dimensions", "output_dimension"),
    (E, embed(images=URIS[:1]), 400, INPUT, "images"),
    (E, embed(inputs=[_text("a")]), 400, INPUT, "inputs"),
    (E, embed(texts=None), 400, INPUT, "texts"),
    (E, embed(texts=[]), 400, INPUT, "texts"),
    (E, embed(texts=None, images=[]), 400, INPUT, "images"),
    (E, embed(embedding_types=[]), 400, INPUT, "embedding_types"),
    (E, embed(texts=["a", ""]), 400, INPUT, "texts[1]"),
    (E, embed(texts=["a"] * OVER), 413, "too_many_items", "texts"),
    (E, embed(texts=None, inputs=[_text("a")] * OVER), 413, "too_many_items", "inputs"),
    (E, embed(texts=None, images=URIS[:1] * OVER_IMAGES), 413, MANY, f"images[{LAST}]"),
    (E, embed(texts=None, images=[URIS[0], BROKEN]), 400, INPUT, "images[1]"),
    (E, embed(texts=None, images=["not base64 !!"]), 400, "invalid_image", "images[0]"),
    (E, embed(texts=None, inputs=[_text("a"), MIXED]), 400, UNSUPPORTED, "inputs[1].content"),
    (E, embed(texts=None, inputs=[{"content": []}]), 400, INPUT, "inputs[0].content"),
    (E, embed(texts=None, inputs=[one({"type": "x"})]), 422, SCHEMA, "inputs[0].content[0].type"),
    (E, embed(texts=None, inputs=[_text(5)]), 422, SCHEMA, "inputs[0].content[0].text"),
    (E, embed(texts=None, inputs=[_url({})]), 422, SCHEMA, "inputs[0].content[0].image_url.url"),
    (E, embed(texts=None, inputs=[{"content": "a dog"}]), 422, SCHEMA, "inputs[0].content"),
    (E, embed(model="embed-v4.0"), 404, "model_not_found", "model"),
    # Voyage.
    (M, {"inputs": "a dog"}, 422, SCHEMA, "inputs"),
    (M, {}, 422, SCHEMA, "inputs"),
    (M, {"inputs": []}, 400, INPUT, "inputs"),
    (M, {"inputs": [_text("a")] * OVER}, 413, "too_many_items", "inputs"),
    (M, {"inputs": [_image(URIS[0])] * OVER_IMAGES}, 413, MANY, f"inputs[{LAST}].content[0]"),
    (M, {"inputs": [MIXED]}, 400, UNSUPPORTED, "inputs[0].content"),
    (M, {"inputs": [one({"type": "video_url", "video_url": "https://a/b.mp4"})]}, 400,
     UNSUPPORTED, "inputs[0].content[0]"),
    (M, {"inputs": [_image("iVBORw0KGgo=")]}, 400, "invalid_image",
     "inputs[0].content[0].image_base64"),
    (M, {"inputs": [_image(BROKEN)]}, 400, INPUT, "inputs[0].content[0]"),
    (M, {"inputs": [_text("")]}, 400, INPUT, "inputs[0].content[0]"),
    (M, {"inputs": [_text("a")], "input_type": "search_query"}, 422, SCHEMA, "input_type"),
    (M, {"inputs": [_text("a")], "truncation": "nope"}, 422, SCHEMA, "truncation"),
    (M, {"inputs": [_text("a")], "output_encoding": "hex"}, 422, SCHEMA, "output_encoding"),
    (M, {"inputs": [_text("a")], "output_dtype": "fp16"}, 422, SCHEMA, "output_dtype"),
    (M, {"inputs": [_text("a")], "output_dimension": 3}, 400, "unsupported_dimensions",
     "output_dimension"),
]  # fmt: skip


def test_every_field_is_refused_by_name(server: ServerProcess) -> None:
    for path, body, status, code, param in BAD:
        r = post(server, path, body)
        assert r.status_code == status, (path, body, r.text[:300])
        assert (error(r)["code"], error(r)["param"]) == (code, param), (path, body, r.text[:300])


def test_image_urls_are_refused_as_on_v1_embeddings(server: ServerProcess) -> None:
    url = "https://example.com/dog.png"
    want = error(post(server, "/v1/embeddings", {"input": [url], "modality": "image"}))
    assert want["code"] == "url_fetch_disabled"
    for path, body, param in [
        (E, embed(texts=None, images=[url]), "images[0]"),
        (E, embed(texts=None, inputs=[_url({"url": url})]), "inputs[0].content[0]"),
        (M, {"inputs": [_url(url)]}, "inputs[0].content[0]"),
    ]:
        r = post(server, path, body)
        assert r.status_code == 400
        assert error(r) == {**want, "param": param}


def test_auth_is_required(server: ServerProcess) -> None:
    for path, body in [(E, embed()), (M, {"inputs": [_text("a")]})]:
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"


# -- metering -------------------------------------------------------------------------------------


def test_a_metered_key_is_billed_for_both_routes(server: ServerProcess, store: KeyStore) -> None:
    secret = store.create("shapes", credits=100)
    deadline = time.monotonic() + 20
    while (warm := post(server, E, embed(texts=["warm"]), key=secret)).status_code != 200:
        assert warm.status_code == 401 and time.monotonic() < deadline, warm.text
        time.sleep(0.1)  # the server reads new keys about once a second
    warm_tokens = warm.json()["meta"]["billed_units"]["input_tokens"]
    body = {
        **DOC,
        "inputs": [_text("a dog"), {"content": [{"type": "image_url", "image_url": URIS[0]}]}],
    }
    r = post(server, E, body, key=secret)
    assert r.status_code == 200, r.text
    billed = r.json()["meta"]["billed_units"]["input_tokens"]
    r = post(server, M, {"inputs": [_image(URIS[1])]}, key=secret)
    assert r.status_code == 200, r.text
    total = r.json()["usage"]["total_tokens"]
    r = post(server, M, {"inputs": [MIXED]}, key=secret)  # refused before any work: not billed
    assert r.status_code == 400
    report = httpx.get(
        server.url + "/v1/usage", headers={"Authorization": f"Bearer {secret}"}
    ).json()
    assert report["remaining"]["credits"] == 100 - 1 - (1 + IMAGE_CREDITS) - IMAGE_CREDITS
    rows = {(row["endpoint"], row["status"]): row for row in report["data"]}
    cohere_row = rows[(E, 200)]
    assert (cohere_row["requests"], cohere_row["texts"], cohere_row["images"]) == (2, 2, 1)
    assert cohere_row["credits"] == 1 + 1 + IMAGE_CREDITS
    multimodal = rows[(M, 200)]
    assert (multimodal["texts"], multimodal["images"], multimodal["credits"]) == (
        0,
        1,
        IMAGE_CREDITS,
    )
    assert multimodal["tokens"] == total and cohere_row["tokens"] == warm_tokens + billed
    assert rows[(M, 400)]["credits"] == 0
