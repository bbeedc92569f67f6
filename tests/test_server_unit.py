"""Server pieces without a server: SSRF checks, pairing, batching, settings, auth, OpenAPI."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blipitm.engine import PairScores, TextFeatures
from blipitm.engine.batcher import Batcher, QueueFull
from blipitm.engine.jobs import EmbedTexts, ScorePairs
from blipitm.errors import InvalidInputError
from blipitm.server import settings as settings_mod
from blipitm.server.errors import APIError
from blipitm.server.gateway.auth import KeyChecker, needs_key
from blipitm.server.inputs import (
    ImageItem,
    TextItem,
    check_rerank_modalities,
    classify,
    embedding_items,
    loc_mapper,
    pair_indices,
    plan_pairs,
)
from blipitm.server.schemas import ImageURL, ImageURLPart, TextPart
from blipitm.server.settings import OPTIONS, ServerSettings, from_env
from blipitm.server.urlfetch import URLFetcher, forbidden_reason
from server_helpers import image_server, png_bytes

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# -- SSRF address checks --------------------------------------------------------------------------

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "0.0.0.0",
    "224.0.0.1",  # multicast (Python calls it global)
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.0.8",
    "198.18.0.1",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",  # site-local (Python calls it global)
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::1",  # 6to4 embedding 127.0.0.1 (Python calls it global)
    "2002:a9fe:a9fe::1",  # 6to4 embedding 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1 (Python calls it global)
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_loopback_switch_allows_only_loopback() -> None:
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert forbidden_reason(ipaddress.ip_address(address), allow_loopback=True) is None
    for address in ("10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "0.0.0.0"):
        assert forbidden_reason(ipaddress.ip_address(address), allow_loopback=True) is not None


def _fetcher(answers: dict[str, list[str]], **kw: Any) -> URLFetcher:
    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    return URLFetcher(max_bytes=1000, timeout_s=2, max_redirects=2, resolver=resolve, **kw)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "url_scheme_not_allowed"),
        ("gopher://example.com/", "url_scheme_not_allowed"),
        ("http://internal.example/", "url_forbidden"),  # one of its addresses is private
        ("http://rebind.example/", "url_forbidden"),
        ("http://user:pw@public.example/", "url_forbidden"),
        ("http://127.0.0.1/", "url_forbidden"),
        ("http://[::ffff:127.0.0.1]/", "url_forbidden"),
        ("http://2130706433/", "url_forbidden"),  # decimal form of 127.0.0.1
    ],
)
def test_fetcher_refuses_before_connecting(url: str, code: str) -> None:
    answers = {
        "internal.example": ["93.184.216.34", "10.1.2.3"],
        "rebind.example": ["169.254.169.254"],
        "public.example": ["93.184.216.34"],
        "127.0.0.1": ["127.0.0.1"],
        "::ffff:127.0.0.1": ["::ffff:127.0.0.1"],
        "2130706433": ["127.0.0.1"],
    }
    fetcher = _fetcher(answers)
    with pytest.raises(APIError) as info:
        asyncio.run(fetcher.fetch(url, param="input[0]"))
    assert info.value.code == code
    assert info.value.param == "input[0]"


def test_fetcher_allowlist() -> None:
    fetcher = _fetcher({"other.example": ["93.184.216.34"]}, allowlist=["images.example"])
    with pytest.raises(APIError, match="allowlist"):
        asyncio.run(fetcher.fetch("https://other.example/a.png", param="p"))


def test_fetcher_pins_the_checked_address_against_dns_rebinding() -> None:
    """A name that answers an allowed address at the check and a private one afterwards (DNS
    rebinding): the fetch connects to the address it checked, and each hop is resolved and
    checked again. Loopback stands in for a public address (the test switch), so no network."""
    image = png_bytes((10, 200, 30))
    routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, image),
        "/hop": (302, {"Location": "/img.png"}, b""),
    }

    async def fetch(path: str, port: int) -> tuple[bytes | APIError, list[str]]:
        answers = [["127.0.0.1"], ["10.0.0.1"]]  # allowed first, private on every later query
        calls: list[str] = []

        async def rebinding(host: str, _: int) -> list[str]:
            calls.append(host)
            return answers[min(len(calls), len(answers)) - 1]

        fetcher = URLFetcher(
            max_bytes=10_000, timeout_s=5, max_redirects=2, allow_loopback=True, resolver=rebinding
        )
        try:
            return await fetcher.fetch(f"http://rebind.example:{port}{path}", param="p"), calls
        except APIError as e:
            return e, calls
        finally:
            await fetcher.aclose()

    with image_server(routes) as base:
        port = int(base.rsplit(":", 1)[1])
        # One check, then the connection goes to the checked address: the name is never
        # resolved again (by the system resolver, it would not resolve at all).
        assert asyncio.run(fetch("/img.png", port)) == (image, ["rebind.example"])
        # The redirect's hop resolves the name again, now to a private address: refused.
        refused, calls = asyncio.run(fetch("/hop", port))
        assert isinstance(refused, APIError), refused
        assert (refused.code, refused.param) == ("url_forbidden", "p")
        assert "10.0.0.1" in refused.message and calls == ["rebind.example"] * 2


# -- items and pairing ----------------------------------------------------------------------------


def test_pair_indices_follow_vllm() -> None:
    assert pair_indices(1, 1) == [(0, 0)]
    assert pair_indices(1, 3) == [(0, 0), (0, 1), (0, 2)]
    assert pair_indices(3, 3) == [(0, 0), (1, 1), (2, 2)]
    for n1, n2 in ((3, 1), (2, 3), (0, 1), (1, 0)):
        with pytest.raises(APIError) as info:
            pair_indices(n1, n2)
        assert info.value.status == 400


IMG = "data:image/png;base64,AAAA"


def test_classify_strings_parts_and_tokens() -> None:
    assert classify("a dog", ("x",)) == TextItem("a dog", ("x",))
    assert classify(IMG, ("x",)) == ImageItem(IMG, ("x",))
    upper = "DATA:IMAGE/JPEG;base64,AA"
    assert classify(upper, ("x",)) == ImageItem(upper, ("x",))
    assert classify("https://a/b.png", ("x",)) == TextItem("https://a/b.png", ("x",))
    assert classify("https://a/b.png", ("x",), strings_are_images=True) == ImageItem(
        "https://a/b.png", ("x",)
    )
    part = ImageURLPart(type="image_url", image_url=ImageURL(url="https://a/b.png"))
    assert classify(part, ("x",)) == ImageItem("https://a/b.png", ("x",))
    assert classify(TextPart(type="text", text="hi"), ("x",)) == TextItem("hi", ("x",))
    with pytest.raises(APIError, match="token id"):
        embedding_items([1, 2, 3], modality="text", max_items=10)
    with pytest.raises(APIError) as info:
        embedding_items(["a", [1, 2]], modality="text", max_items=10)
    assert info.value.param == "input[1]"
    with pytest.raises(APIError) as info:
        embedding_items(["a"] * 11, modality="text", max_items=10)
    assert info.value.status == 413


def test_plan_pairs_either_order_and_dedup() -> None:
    img = ImageItem(IMG, ("text_1",))
    texts = [TextItem("a", ("text_2", 0)), TextItem("b", ("text_2", 1))]
    plan = plan_pairs([img], texts)
    assert plan.images == [img] and plan.texts == texts
    assert plan.pairs == [(0, 0), (0, 1)]
    # N:N with images on either side of each pair.
    side1 = [TextItem("a", ("text_1", 0)), ImageItem(IMG, ("text_1", 1))]
    side2 = [ImageItem(IMG, ("text_2", 0)), TextItem("b", ("text_2", 1))]
    plan = plan_pairs(side1, side2)
    assert [it.param for it in plan.images] == ["text_2[0]", "text_1[1]"]
    assert [it.param for it in plan.texts] == ["text_1[0]", "text_2[1]"]
    assert plan.pairs == [(0, 0), (1, 1)]


def test_plan_pairs_refuses_same_modality() -> None:
    with pytest.raises(APIError) as info:
        plan_pairs([TextItem("a", ("text_1",))], [TextItem("b", ("text_2", 0))])
    assert (info.value.status, info.value.param, info.value.code) == (
        400,
        "text_2[0]",
        "invalid_pairing",
    )
    with pytest.raises(APIError):
        plan_pairs([ImageItem(IMG, ("text_1",))], [ImageItem(IMG, ("text_2", 0))])
    with pytest.raises(APIError) as info:
        check_rerank_modalities(
            TextItem("q", ("query",)),
            [ImageItem(IMG, ("documents", 0)), TextItem("t", ("documents", 1))],
        )
    assert info.value.param == "documents[1]"


def test_loc_mapper() -> None:
    texts = [TextItem("a", ("input", 2)), TextItem("b", ("input", 5))]
    m = loc_mapper(texts=texts)
    assert m(("texts", 1)) == ("input", 5)
    assert m(("texts", 9)) == ("texts", 9)
    assert m(()) == ()
    q = TextItem("q", ("query",))
    assert loc_mapper(q, candidates=texts)(("query",)) == ("query",)


# -- the batcher ----------------------------------------------------------------------------------


class FakeEngine:
    """Records calls; 'BAD' texts raise like the engine does; an optional gate blocks calls."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.gate = gate

    def _wait(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)

    def encode_texts(self, texts: list[str]) -> TextFeatures:
        self._wait()
        self.calls.append(("encode_texts", len(texts)))
        for i, t in enumerate(texts):
            if t == "BAD":
                raise InvalidInputError("bad text", loc=("texts", i))
        emb = np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)
        return TextFeatures(emb, np.array([len(t) + 2 for t in texts], dtype=np.int64))

    def embed_images(self, images: list[Any]) -> np.ndarray:
        raise AssertionError("not used")

    def score_pairs(self, images: list[Any], texts: list[str], pairs: Any) -> PairScores:
        self._wait()
        self.calls.append(("score_pairs", len(pairs)))
        p = np.array([images[i] * 10 + len(texts[t]) for i, t in pairs], dtype=np.float32)
        tokens = np.array([len(t) + 2 for t in texts], dtype=np.int64)
        return PairScores(p, np.stack([p, p], axis=1), p, tokens)

    def rank_texts(self, *a: Any, **k: Any) -> list[Any]:
        raise AssertionError("not used")

    def rank_images(self, *a: Any, **k: Any) -> list[Any]:
        raise AssertionError("not used")


def _batcher(engine: FakeEngine, **kw: Any) -> Batcher:
    args = {"max_batch_size": 8, "max_wait_ms": 1.0, "max_queue": 16}
    return Batcher(engine, **{**args, **kw})  # type: ignore[arg-type]


def test_batcher_merges_and_splits() -> None:
    engine = FakeEngine()
    b = _batcher(engine)
    # Queued before the worker starts, so the first batch holds all of them.
    futs = [b.submit(EmbedTexts(["a" * n, "b"])) for n in (1, 2, 3)]
    s1 = b.submit(ScorePairs([1], ["xy", "xyz"], [(0, 0), (0, 1)]))
    s2 = b.submit(ScorePairs([2, 3], ["q"], [(1, 0)]))
    b.start()
    try:
        out = [f.result(5) for f in futs]
        assert [o.embeddings[:, 0].tolist() for o in out] == [[1, 1], [2, 1], [3, 1]]
        # Each request gets its own texts' token counts back (the fake counts len + 2).
        assert [o.text_tokens.tolist() for o in out] == [[3, 3], [4, 3], [5, 3]]
        assert s1.result(5).itm_probability.tolist() == [12, 13]
        assert s2.result(5).itm_probability.tolist() == [31]
        assert s1.result(5).text_tokens.tolist() == [4, 5]
        assert s2.result(5).text_tokens.tolist() == [3]
        assert sorted(engine.calls) == [("encode_texts", 6), ("score_pairs", 3)]
    finally:
        b.stop()


def test_batcher_isolates_a_bad_request() -> None:
    engine = FakeEngine()
    b = _batcher(engine)
    good = b.submit(EmbedTexts(["ok"]))
    bad = b.submit(
        EmbedTexts(["fine", "BAD"]), lambda loc: ("input", 1) if loc == ("texts", 1) else loc
    )
    good2 = b.submit(EmbedTexts(["ok!"]))
    b.start()
    try:
        assert good.result(5).embeddings[:, 0].tolist() == [2]
        assert good2.result(5).embeddings[:, 0].tolist() == [3]
        with pytest.raises(InvalidInputError) as info:
            bad.result(5)
        assert info.value.field == "input[1]"  # translated into the request's own param
        # The merged call failed, then each request ran alone.
        assert engine.calls[0] == ("encode_texts", 4)
        assert sorted(engine.calls[1:]) == [
            ("encode_texts", 1),
            ("encode_texts", 1),
            ("encode_texts", 2),
        ]
    finally:
        b.stop()


def test_batcher_skips_cancelled_work_and_refuses_when_full() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate)
    b = _batcher(engine, max_batch_size=1, max_queue=2)
    b.start()
    try:
        first = b.submit(EmbedTexts(["running"]))
        deadline = time.monotonic() + 5
        while b.depth and time.monotonic() < deadline:  # wait until the worker holds it
            time.sleep(0.01)
        dropped = b.submit(EmbedTexts(["client went away"]))
        kept = b.submit(EmbedTexts(["kept"]))
        with pytest.raises(QueueFull) as info:
            b.submit(EmbedTexts(["one too many"]))
        assert info.value.retry_after_s >= 1
        assert dropped.cancel()
        gate.set()
        assert first.result(5).embeddings.shape == (1, 2)
        assert kept.result(5).embeddings[:, 0].tolist() == [4]
        assert engine.calls == [("encode_texts", 1), ("encode_texts", 1)]  # dropped never ran
    finally:
        gate.set()
        b.stop()


# -- settings, auth -------------------------------------------------------------------------------


def test_settings_from_env_and_precedence() -> None:
    env = {
        "BLIPITM_PORT": "9001",
        "BLIPITM_API_KEYS": "k1, k2",
        "BLIPITM_ALLOW_URL_FETCH": "true",
        "BLIPITM_URL_ALLOWLIST": "a.example,b.example",
        "BLIPITM_MAX_WAIT_MS": "2.5",
    }
    s = from_env(env)
    assert (s.port, s.api_keys, s.allow_url_fetch, s.max_wait_ms) == (9001, ("k1", "k2"), True, 2.5)
    assert s.url_allowlist == ("a.example", "b.example")
    assert from_env(env, port=1234).port == 1234
    assert "k1" not in repr(s)  # keys never printed
    with pytest.raises(InvalidInputError, match="BLIPITM_PORT"):
        from_env({"BLIPITM_PORT": "eighty"})
    with pytest.raises(InvalidInputError):
        ServerSettings(max_queue=0)


def test_loopback_switch_is_not_configurable() -> None:
    assert all("loopback" not in o.name for o in OPTIONS)
    s = from_env(
        {"BLIPITM__ALLOW_LOOPBACK_FOR_TESTS": "1", "BLIPITM_ALLOW_LOOPBACK_FOR_TESTS": "1"}
    )
    assert s._allow_loopback_for_tests is False


def test_cli_flags_cover_every_option() -> None:
    from blipitm.cli.main import build_parser
    from blipitm.cli.serve import settings_from_args

    args = build_parser().parse_args(
        ["serve", "--api-key", "a", "--api-key", "b", "--max-queue", "3", "--allow-url-fetch"]
    )
    s = settings_from_args(args)
    assert (s.api_keys, s.max_queue, s.allow_url_fetch, s.host) == (
        ("a", "b"),
        3,
        True,
        "127.0.0.1",
    )
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for opt in OPTIONS:
        assert opt.flag in help_text and opt.env in help_text


def test_key_checker() -> None:
    keys = KeyChecker(["secret-1", "secret-2"])
    assert keys.check("Bearer secret-2") and keys.check("bearer secret-1")
    for header in (None, "", "Bearer", "Bearer secret", "Basic secret-1", "secret-1"):
        assert not keys.check(header)
    assert KeyChecker([]).check(None)
    assert needs_key("/v1/embeddings", False) and needs_key("/v2/rerank", False)
    assert not needs_key("/health", False) and not needs_key("/metrics", False)
    assert needs_key("/metrics", True)


# -- committed documents --------------------------------------------------------------------------


def test_openapi_json_is_current() -> None:
    from blipitm.server.app import create_app
    from blipitm.server.openapi import render

    committed = (DOCS / "openapi.json").read_text()
    assert committed == render(create_app(ServerSettings())), (
        "docs/openapi.json is stale: python -m blipitm.server.openapi > docs/openapi.json"
    )


def test_server_doc_lists_every_setting() -> None:
    text = (DOCS / "server.md").read_text()
    assert settings_mod.markdown_table() in text, "regenerate the table in docs/server.md"


def test_docs_say_served_model_name_where_they_serve_a_local_copy() -> None:
    """A local copy is served under its --model string, so the README's OpenAI snippet (which
    sends the hub name) fails with 404 unless --served-model-name is given with it."""
    for doc in (REPO / "README.md", DOCS / "server.md"):
        for paragraph in doc.read_text().split("\n\n"):
            if re.search(r"--model \.?\.?/", paragraph) and re.search(r"\bserver?\b", paragraph):
                assert "--served-model-name" in paragraph, (doc.name, paragraph)
