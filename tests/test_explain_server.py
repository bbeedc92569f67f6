"""``POST /v1/explain`` and the playground's routes, in-process (httpx over ASGI) on the tiny
checkpoint: values equal the Python API, errors, auth, the page's headers, and isolation (other
requests run between an explanation's pieces)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.engine import Engine
from blipitm.explain import overlay
from blipitm.server.app import create_app
from blipitm.server.settings import ServerSettings
from server_helpers import data_uri, png_bytes

IMAGE = png_bytes((200, 30, 30), size=(40, 30))
URI = data_uri(IMAGE)
TEXTS = ["a red square", "blue", "a small thing on a large table"]


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    return blipitm.load(tiny_ckpt)


class Shared:
    """The module's engine behind several apps (an app's shutdown must not close it); records the
    order of the jobs the inference worker runs."""

    def __init__(self, real: Engine) -> None:
        self.real = real
        self.calls: list[str] = []
        self.first_explain = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def explain_batch(self, image: Any, texts: list[str], *, layer: int | None = None) -> Any:
        self.calls.append("explain")
        self.first_explain.set()
        assert self.release.wait(20)
        return self.real.explain_batch(image, texts, layer=layer)

    def score_pairs(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("score")
        return self.real.score_pairs(*args, **kwargs)

    def close(self) -> None:
        pass


@asynccontextmanager
async def running(
    settings: ServerSettings, factory: Callable[[ServerSettings], Any]
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings, factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for _ in range(600):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client, app.state.blipitm


def decode(t: dict[str, Any]) -> np.ndarray:
    assert t["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])


def png_pixels(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_explain_equals_the_python_api(engine: Engine) -> None:
    async def main() -> None:
        async with running(ServerSettings(), lambda s: Shared(engine)) as (client, _):
            r = await client.post(
                "/v1/explain", json={"image": URI, "texts": TEXTS, "overlays": "tokens"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["layer"], body["num_layers"], body["grid"]) == (0, 2, 3)
            want = engine.explain_batch(Image.open(io.BytesIO(IMAGE)), TEXTS)
            for d, e in zip(body["data"], want, strict=True):
                assert d["object"] == "explanation" and d["text"] == e.text
                assert d["tokens"] == e.tokens
                scale = float(e.token_maps.max())
                np.testing.assert_allclose(decode(d["token_maps"]), e.token_maps, atol=3e-6 * scale)
                np.testing.assert_allclose(decode(d["map"]), e.map, atol=3e-6 * scale)
                assert d["itm_probability"] == pytest.approx(e.itm_probability, abs=2e-6)
                assert d["itc_cosine"] == pytest.approx(e.itc_cosine, abs=1e-6)
                np.testing.assert_allclose(d["itm_logits"], e.itm_logits, atol=5e-6)
                # Overlays: the maps sent, drawn over the model's input image (min-max
                # normalisation magnifies float noise, so the maps drawn are the response's own).
                drawn = np.asarray(overlay(e.image, decode(d["map"])))
                np.testing.assert_array_equal(png_pixels(d["overlay"]), drawn)
                tokens = decode(d["token_maps"])
                assert len(d["token_overlays"]) == len(e.tokens)
                for uri, cam in zip(d["token_overlays"], tokens, strict=True):
                    np.testing.assert_array_equal(png_pixels(uri), overlay(e.image, cam))
            ids = sum(len(e.tokens) + 2 for e in want)
            assert body["usage"]["prompt_tokens"] == ids + engine.info.image_tokens

            r = await client.post(
                "/v1/explain", json={"image": URI, "texts": "blue", "layer": 1, "token_maps": False}
            )
            d = r.json()["data"][0]
            assert r.json()["layer"] == 1 and d["token_maps"] is None and d["overlay"] is None
            assert decode(d["map"]).shape == (3, 3)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"image": URI, "texts": ["a"], "layer": 2}, 400, "layer"),
        ({"image": URI, "texts": ["a"], "layer": -1}, 400, "layer"),
        ({"image": "data:image/png;base64,AAAA", "texts": ["a"]}, 400, "image"),
        ({"image": URI, "texts": ["a", ""]}, 400, "texts[1]"),
        ({"image": URI, "texts": []}, 400, "texts"),
        ({"image": URI, "texts": ["a"] * 5}, 413, "texts"),
        ({"image": URI, "texts": ["a"], "model": "other"}, 404, "model"),
        ({"image": URI}, 422, None),
        ({"image": URI, "texts": ["a"], "overlays": "all"}, 422, None),
    ],
)
def test_errors_use_the_envelope(engine: Engine, body: dict, status: int, param: str) -> None:
    async def main() -> None:
        settings = ServerSettings(max_items=4)
        async with running(settings, lambda s: Shared(engine)) as (client, _):
            r = await client.post("/v1/explain", json=body)
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["message"]
            if param is not None:
                assert error["param"] == param

    asyncio.run(main())


def test_auth_and_the_pages_headers(engine: Engine) -> None:
    async def main() -> None:
        settings = ServerSettings(api_keys=("k1",))
        async with running(settings, lambda s: Shared(engine)) as (client, _):
            body = {"image": URI, "texts": ["a"]}
            assert (await client.post("/v1/explain", json=body)).status_code == 401
            ok = await client.post("/v1/explain", json=body, headers={"Authorization": "Bearer k1"})
            assert ok.status_code == 200
            # The page loads without a key (it holds no data); the API behind it needs one.
            for path in ("/", "/playground"):
                page = await client.get(path)
                assert page.status_code == 200 and "<title>blipitm playground" in page.text
                csp = page.headers["content-security-policy"]
                assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "http" not in csp
                assert page.headers["x-content-type-options"] == "nosniff"
            for name, kind in (("playground.js", "javascript"), ("playground.css", "css")):
                asset = await client.get(f"/playground/{name}")
                assert asset.status_code == 200 and kind in asset.headers["content-type"]
            assert (await client.get("/playground/../app.py")).status_code == 404
            assert (await client.get("/playground/nothing.js")).status_code == 404
            # The page's policy is its own: API responses are as before.
            assert "content-security-policy" not in ok.headers

    asyncio.run(main())


def test_other_requests_run_between_an_explanations_pieces(engine: Engine) -> None:
    """An explanation of 3 captions is 3 jobs; a score request that arrives while the first runs
    is computed before the second, not after the whole explanation."""
    shared = Shared(engine)
    shared.release.clear()

    async def main() -> None:
        settings = ServerSettings(max_batch_size=1, max_wait_ms=0)
        async with running(settings, lambda s: shared) as (client, state):
            shared.calls.clear()
            explain = asyncio.create_task(
                client.post("/v1/explain", json={"image": URI, "texts": TEXTS})
            )
            for _ in range(2000):
                if shared.first_explain.is_set():
                    break
                await asyncio.sleep(0.01)
            score = asyncio.create_task(
                client.post("/v1/score", json={"text_1": URI, "text_2": ["a red square"]})
            )
            for _ in range(2000):
                if state.require_ready().batcher.depth == 1:
                    break
                await asyncio.sleep(0.01)
            shared.release.set()
            r_explain, r_score = await asyncio.gather(explain, score)
            assert r_explain.status_code == 200 and r_score.status_code == 200
            assert shared.calls == ["explain", "score", "explain", "explain"]

    try:
        asyncio.run(main())
    finally:
        shared.release.set()


def test_every_playground_file_is_package_data() -> None:
    """A non-editable install ships only what pyproject's package-data names."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["blipitm.server"]
    folder = root / "src" / "blipitm" / "server" / "playground"
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir())
    assert {"playground/index.html", "playground/playground.js"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
