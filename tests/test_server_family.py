"""Several models behind one server (issue 20 §1): routing by ``model``, aliases, the default, an
unknown name, results per model equal to ``blipitm.load(that model)``, load on demand and LRU
eviction, a model that fails to load kept to itself, fairness between models, per-model prices
and access, ``/v1/models``, metrics by model, and the models file's errors.

One real ``blipitm serve`` (three tiny checkpoints of different seeds and a broken one) for what a
client sees; the app in-process, with a gated engine, where a test must hold a model's worker."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import blipitm
from blipitm.cli.serve import add_parser, settings_from_args
from blipitm.engine import Engine, LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.keys import KeyStore
from blipitm.server.settings import ServerSettings
from blipitm.testing.make_checkpoint import make_checkpoint
from server_helpers import ServerProcess, cli_server, data_uri, free_port, metric, png_bytes
from test_server_inprocess import GatedEngine, Shared, running

OPERATOR = "family-operator-key"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
TEXTS = ["a red square", "two dogs on a beach"]
IMAGES = [png_bytes((200, 30, 30)), png_bytes((10, 90, 220), (50, 70))]


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny checkpoints of different weights, and one whose weights file is cut short."""
    root = tmp_path_factory.mktemp("family")
    broken = root / "broken"
    shutil.copytree(tiny_ckpt, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {
        "alpha": tiny_ckpt,
        "beta": make_checkpoint(root / "beta", preset="tiny", seed=1),
        "gamma": make_checkpoint(root / "gamma", preset="tiny", seed=2),
        "broken": broken,
    }


def models_file(path: Path, ckpts: dict[str, Path]) -> Path:
    path.write_text(
        f"""
[[model]]
source = "{ckpts["alpha"]}"
name = "alpha"
aliases = ["a", "first"]

[[model]]
source = "{ckpts["beta"]}"
name = "beta"
preload = false
text_credits = 2
image_credits = 5

[[model]]
source = "{ckpts["gamma"]}"
name = "gamma"
preload = false
protocol = "transformers"

[[model]]
source = "{ckpts["broken"]}"
name = "broken"
preload = false
"""
    )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("family-keys") / "keys.db")


@pytest.fixture(scope="module")
def server(
    ckpts: dict[str, Path], store: KeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    file = models_file(tmp_path_factory.mktemp("family-conf") / "models.toml", ckpts)
    flags = ["--models-file", str(file), "--max-loaded-models", "2", "--api-key", OPERATOR]
    flags += ["--keys-db", str(store.path), "--image-credits", "3", "--max-wait-ms", "1"]
    with cli_server(ckpts["alpha"], *flags) as s:
        yield s


@pytest.fixture(scope="module")
def engines(ckpts: dict[str, Path]) -> dict[str, Engine]:
    """The in-process references: each checkpoint loaded as the models file loads it."""
    return {
        "alpha": blipitm.load(ckpts["alpha"]),
        "beta": blipitm.load(ckpts["beta"]),
        "gamma": blipitm.load(ckpts["gamma"], protocol="transformers"),
    }


def post(server: ServerProcess, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers or AUTH, timeout=60)


def cards(server: ServerProcess, headers: dict[str, str] = AUTH) -> dict[str, dict[str, Any]]:
    r = httpx.get(server.url + "/v1/models", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return {card["id"]: card for card in r.json()["data"]}


def embed(server: ServerProcess, model: str | None, inputs: list[str]) -> np.ndarray:
    body: dict[str, Any] = {"input": inputs}
    if model is not None:
        body["model"] = model
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == (model if model in ("alpha", "beta", "gamma") else "alpha")
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


# -- routing and results --------------------------------------------------------------------------


def test_models_lists_the_family_with_status_names_and_prices(server: ServerProcess) -> None:
    got = cards(server)
    assert list(got) == ["alpha", "beta", "gamma", "broken"]
    alpha, beta = got["alpha"], got["beta"]
    assert alpha["default"] and not beta["default"]
    assert alpha["status"] == "ready" and alpha["embedding_dim"] == 256
    assert set(alpha["aliases"]) >= {"a", "first"}
    assert not any("/" in a for a in alpha["aliases"]), "paths are not shown without --expose-paths"
    assert alpha["price"] == {"text": 1, "image": 3}  # --image-credits is the default price
    assert beta["price"] == {"text": 2, "image": 5}
    assert got["gamma"]["protocol"] == "transformers" and got["alpha"]["protocol"] == "blip"
    one = httpx.get(server.url + "/v1/models/first", headers=AUTH, timeout=10)
    assert one.status_code == 200 and one.json()["id"] == "alpha"


def test_each_model_answers_as_blipitm_load_of_it(
    server: ServerProcess, engines: dict[str, Engine]
) -> None:
    """Texts and images through each model (named, by alias, or by default) equal the in-process
    engine of that checkpoint (fp32; 1e-6: batch composition moves the last bits)."""
    uris = [data_uri(im) for im in IMAGES]
    for name, asked in [("alpha", None), ("alpha", "a"), ("beta", "beta"), ("gamma", "gamma")]:
        ref = engines[name]
        np.testing.assert_allclose(
            embed(server, asked, TEXTS), ref.embed_texts(TEXTS), atol=1e-6, rtol=0
        )
        np.testing.assert_allclose(
            embed(server, asked, uris), ref.embed_images(IMAGES), atol=1e-6, rtol=0
        )
        body: dict[str, Any] = {"text_1": uris, "text_2": TEXTS}
        if asked is not None:
            body["model"] = asked
        r = post(server, "/v1/score", body)
        assert r.status_code == 200, r.text
        want = ref.score(IMAGES, TEXTS)
        got = [d["score"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
        np.testing.assert_allclose(got, want.itm_probability, atol=1e-6, rtol=0)
    # Different weights give different answers: the routing is not one model under three names.
    assert not np.allclose(embed(server, "alpha", TEXTS), embed(server, "beta", TEXTS), atol=1e-3)


def test_an_unknown_model_is_404_naming_the_served_ones(server: ServerProcess) -> None:
    r = post(server, "/v1/embeddings", {"input": ["x"], "model": "blip-large"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'alpha'" in err["message"] and "'gamma'" in err["message"]


def test_a_model_that_cannot_load_fails_alone(server: ServerProcess) -> None:
    r = post(server, "/v1/embeddings", {"input": ["x"], "model": "broken"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable"
    again = post(server, "/v1/embeddings", {"input": ["x"], "model": "broken"})
    assert again.json()["error"]["code"] == "model_unavailable"  # not retried on every request
    card = cards(server)["broken"]
    assert card["status"] == "failed" and card["error"], card
    assert str(Path.home()) not in card["error"]  # the reason is in the log, not the response
    assert "model 'broken' failed to load" in server.output()
    assert httpx.get(server.url + "/ready", timeout=5).status_code == 200
    assert post(server, "/v1/embeddings", {"input": ["x"], "model": "alpha"}).status_code == 200


def test_lru_eviction_and_reload_on_demand(
    server: ServerProcess, engines: dict[str, Engine]
) -> None:
    """At most two loaded, the default always one of them: asking for a third unloads the least
    recently used idle other one, which loads again when it is asked for, with the same
    answers."""
    embed(server, "beta", ["warm"])
    embed(server, "alpha", ["most recent"])  # the default is never the one unloaded
    loaded = {n for n, c in cards(server).items() if c["status"] == "ready"}
    assert loaded == {"alpha", "beta"}
    evictions = metric(server, "blipitm_model_evictions_total", model="beta")
    np.testing.assert_allclose(
        embed(server, "gamma", TEXTS), engines["gamma"].embed_texts(TEXTS), atol=1e-6, rtol=0
    )
    states = {n: c["status"] for n, c in cards(server).items()}
    assert states["gamma"] == "ready" and states["alpha"] == "ready", states
    assert states["beta"] == "unloaded", states
    assert metric(server, "blipitm_model_evictions_total", model="beta") == evictions + 1
    assert metric(server, "blipitm_model_loaded", model="beta") == 0
    np.testing.assert_allclose(
        embed(server, "beta", TEXTS), engines["beta"].embed_texts(TEXTS), atol=1e-6, rtol=0
    )
    assert cards(server)["beta"]["status"] == "ready"
    assert metric(server, "blipitm_model_loads_total", model="beta", outcome="ok") >= 2
    assert metric(server, "blipitm_model_loaded", model="beta") == 1


# -- keys: prices and access ----------------------------------------------------------------------


def test_prices_are_per_model_and_access_spans_the_family(
    server: ServerProcess, store: KeyStore
) -> None:
    secret = store.create("family-priced", credits=100)
    limited = store.create("family-beta-only", credits=100, models=["beta"])
    key, only_beta = {"Authorization": f"Bearer {secret}"}, {"Authorization": f"Bearer {limited}"}
    for _ in range(100):  # the server picks up new keys within about a second
        if httpx.get(server.url + "/v1/usage", headers=key, timeout=5).status_code == 200:
            break
        threading.Event().wait(0.1)

    def remaining(headers: dict[str, str]) -> int:
        report = httpx.get(server.url + "/v1/usage", headers=headers, timeout=5).json()
        return int(report["remaining"]["credits"])

    uri = data_uri(IMAGES[0])
    assert post(server, "/v1/embeddings", {"input": TEXTS, "model": "a"}, **key).status_code == 200
    assert remaining(key) == 100 - 2  # alpha: 1 per text
    assert (
        post(server, "/v1/embeddings", {"input": TEXTS, "model": "beta"}, **key).status_code == 200
    )
    assert remaining(key) == 98 - 2 * 2  # beta: 2 per text
    r = post(server, "/v1/embeddings", {"input": [uri], "model": "beta"}, **key)
    assert r.status_code == 200 and remaining(key) == 94 - 5  # beta: 5 per image
    report = httpx.get(server.url + "/v1/usage", headers=key, timeout=5).json()
    assert report["prices"]["beta"] == {"text": 2, "image": 5}
    assert report["prices"]["alpha"] == {"text": 1, "image": 3}
    # Usage is metered per model, under its served name (the request said "a", an alias).
    spent = {(row["model"], row["endpoint"]): row["credits"] for row in report["data"]}
    assert spent == {("alpha", "/v1/embeddings"): 2, ("beta", "/v1/embeddings"): 9}

    assert list(cards(server, only_beta)) == ["beta"]
    assert list(
        httpx.get(server.url + "/v1/usage", headers=only_beta, timeout=5).json()["prices"]
    ) == ["beta"]
    named = post(server, "/v1/embeddings", {"input": ["x"], "model": "alpha"}, **only_beta)
    assert named.status_code == 404 and named.json()["error"]["code"] == "model_not_found"
    default = post(server, "/v1/embeddings", {"input": ["x"]}, **only_beta)
    assert default.status_code == 403 and default.json()["error"]["code"] == "model_not_allowed"
    ok = post(server, "/v1/embeddings", {"input": ["x"], "model": "beta"}, **only_beta)
    assert ok.status_code == 200


# -- in-process: fairness and waiting for a load -------------------------------------------------


def test_a_saturated_model_does_not_hold_up_another(ckpts: dict[str, Path]) -> None:
    """Alpha's worker is held with requests waiting for it; beta's requests are answered
    meanwhile (each model has its own worker and queue), and alpha's all complete once it is
    released."""
    gate = threading.Event()
    gated = GatedEngine(blipitm.load(ckpts["alpha"]), gate)
    beta = blipitm.load(ckpts["beta"])

    def factory(options: LoadOptions) -> Any:
        return gated if Path(options.source) == ckpts["alpha"] else Shared(beta)

    settings = ServerSettings.of(
        model=str(ckpts["alpha"]), more_models=(str(ckpts["beta"]),), max_wait_ms=1
    )
    beta_name = ckpts["beta"].name

    async def main() -> None:
        async with running(settings, factory) as (client, state):
            gate.set()  # the warm-up passes the gate
            for _ in range(500):
                if state.models.models[1].status == "ready":
                    break
                await asyncio.sleep(0.02)
            gate.clear()
            flood = [
                asyncio.create_task(client.post("/v1/embeddings", json={"input": [f"a{i}"]}))
                for i in range(8)
            ]
            while not gated.entered.is_set():
                await asyncio.sleep(0.01)
            for i in range(5):  # beta answers while alpha's worker is held
                r = await client.post(
                    "/v1/embeddings", json={"input": [f"b{i}"], "model": beta_name}
                )
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(
                    r.json()["data"][0]["embedding"], beta.embed_texts([f"b{i}"])[0], atol=1e-6
                )
            assert not any(t.done() for t in flood)
            gate.set()
            assert [(await t).status_code for t in flood] == [200] * 8

    try:
        asyncio.run(main())
    finally:
        gate.set()


def test_a_request_waits_for_its_model_to_load_while_others_serve(ckpts: dict[str, Path]) -> None:
    """An on-demand model's first request waits for the load (the default keeps serving); past
    the request's deadline it is 503 ``model_not_ready`` and the load goes on."""
    release = threading.Event()
    alpha, beta = blipitm.load(ckpts["alpha"]), blipitm.load(ckpts["beta"])

    def factory(options: LoadOptions) -> Any:
        if Path(options.source) == ckpts["beta"]:
            assert release.wait(30)
            return Shared(beta)
        return Shared(alpha)

    settings = ServerSettings.of(
        model=str(ckpts["alpha"]),
        more_models=(str(ckpts["beta"]),),
        load_on_demand=True,
        request_timeout_s=0.5,
    )
    beta_name = ckpts["beta"].name

    async def main() -> None:
        async with running(settings, factory) as (client, state):
            late = await client.post("/v1/embeddings", json={"input": ["x"], "model": beta_name})
            assert late.status_code == 503 and late.json()["error"]["code"] == "model_not_ready"
            assert (await client.post("/v1/embeddings", json={"input": ["x"]})).status_code == 200
            waiting = asyncio.create_task(
                client.post("/v1/embeddings", json={"input": ["y"], "model": beta_name})
            )
            release.set()
            assert (await waiting).status_code in (200, 503)  # 200 unless the deadline won
            for _ in range(500):
                if state.models.models[1].status == "ready":
                    break
                await asyncio.sleep(0.02)
            r = await client.post("/v1/embeddings", json={"input": ["y"], "model": beta_name})
            assert r.status_code == 200
            np.testing.assert_allclose(
                r.json()["data"][0]["embedding"], beta.embed_texts(["y"])[0], atol=1e-6
            )

    try:
        asyncio.run(main())
    finally:
        release.set()


# -- settings: flags and the models file ---------------------------------------------------------


def test_model_repeated_on_the_command_line_serves_each(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), "serve", "serve")
    args = parser.parse_args(
        ["serve", "--model", "m/one", "--model", "/abs/two", "--load-on-demand"]
    )
    specs = settings_from_args(args).models()
    assert [s.name for s in specs] == ["m/one", "two"]
    assert [str(s.load.source) for s in specs] == ["m/one", "/abs/two"]
    assert specs[0].preload and not specs[1].preload
    assert "/abs/two" in specs[1].aliases


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[model]]\nname = 'x'\n", "needs `source`"),
        ("[[model]]\nsource = 'a'\ncolour = 'red'\n", "unknown keys colour"),
        ("[[model]]\nsource = 'a'\nprotocol = 'lavis'\n", "protocol"),
        ("[[model]]\nsource = 'a'\npreload = 'yes'\n", "`preload` must be bool"),
        ("[[model]]\nsource = 'a'\nimage_credits = -1\n", "credits must be >= 0"),
        ("[[model]]\nsource = 'a'\n[[model]]\nsource = 'a'\n", "given to two models"),
        ("[[model]]\nsource = 'a'\nname = 'n'\n[[model]]\nsource = 'b'\naliases = ['n']\n", "'n'"),
        ("model = 3\n", "[[model]] tables"),
        ("[[model\n", "cannot read"),
    ],
)
def test_a_bad_models_file_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match="models") as info:
        ServerSettings.of(models_file=str(path)).models()
    assert message in str(info.value)


def test_serve_refuses_a_bad_models_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[[model]]\nsource = 'a'\nflavour = 1\n")
    port = str(free_port())
    argv = ["-m", "blipitm.cli.main", "serve", "--models-file", str(path), "--port", port]
    server = ServerProcess(argv, int(port))
    try:
        assert server.proc.wait(timeout=60) == 2
    finally:
        server.stop()
    last = server.output().strip().splitlines()[-1]
    assert last.startswith("blipitm: error: models_file:") and "flavour" in last, last


def test_the_documented_models_file_reads_as_it_says() -> None:
    """docs/server.md's example models file (its models need the hub, so only read here)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = Path(tempfile.mkdtemp()) / "models.toml"
    path.write_text(example)
    base, large = ServerSettings.of(models_file=str(path), image_credits=3).models()
    assert (base.name, base.load.dtype, base.index, base.price.image) == (
        "blip-base",
        "bfloat16",
        "indexes/base",
        3,
    )
    assert "base" in base.names and "Salesforce/blip-itm-base-flickr" in base.names
    assert (large.name, large.preload, large.price.text, large.price.image) == (
        "blip-large",
        False,
        2,
        4,
    )


def test_each_model_searches_its_own_index(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """An index is bound to the model it was built with: the models file gives beta one, a search
    naming beta uses it (as search() does in process), and alpha has none (404 naming it)."""
    from blipitm.retrieval import Index, build_index, search

    (tmp_path / "captions.txt").write_text("a dog on the grass\na red car\ntwo cats\n")
    beta = blipitm.load(ckpts["beta"])
    index, _ = build_index(beta, [tmp_path / "captions.txt"], tmp_path / "index")
    index.close()
    file = tmp_path / "models.toml"
    file.write_text(
        f'[[model]]\nsource = "{ckpts["alpha"]}"\nname = "alpha"\n\n'
        f'[[model]]\nsource = "{ckpts["beta"]}"\nname = "beta"\nindex = "{tmp_path / "index"}"\n'
    )
    settings = ServerSettings.of(models_file=str(file))
    query = {"type": "image_url", "image_url": {"url": data_uri(IMAGES[0])}}

    async def main() -> None:
        async with running(settings, lambda options: blipitm.load(options.source)) as (client, st):
            for _ in range(500):
                if st.models.models[1].status == "ready":
                    break
                await asyncio.sleep(0.02)
            r = await client.post("/v1/search", json={"query": query, "top_k": 2, "model": "beta"})
            assert r.status_code == 200, r.text
            want = search(beta, Index.open(tmp_path / "index", beta), IMAGES[0], top_k=2)
            assert [d["id"] for d in r.json()["data"]] == [h.id for h in want]
            none = await client.post("/v1/search", json={"query": "a dog", "model": "alpha"})
            assert none.status_code == 404 and "'alpha'" in none.json()["error"]["message"]

    asyncio.run(main())


def test_the_least_recently_used_idle_model_is_the_one_unloaded(ckpts: dict[str, Path]) -> None:
    """Three of four loaded (the default pinned): loading the fourth unloads whichever of the
    other two was used least recently, not the most recent, and a model in use is never picked."""
    engine = blipitm.load(ckpts["alpha"])
    settings = ServerSettings.of(
        model=str(ckpts["alpha"]),
        more_models=("b", "c", "d"),
        max_loaded_models=3,
        load_on_demand=True,
    )

    async def main() -> None:
        async with running(settings, lambda options: Shared(engine)) as (client, st):

            async def use(name: str) -> None:
                r = await client.post("/v1/embeddings", json={"input": ["x"], "model": name})
                assert r.status_code == 200, r.text

            def loaded() -> set[str]:
                return {m.name for m in st.models.models if m.status == "ready"}

            await use("b")
            await use("c")
            await use("b")  # c is now the least recently used
            await use("d")
            assert loaded() == {"tiny0", "b", "d"}
            await use("c")  # d (used last but one) stays; b goes
            assert loaded() == {"tiny0", "d", "c"}

    asyncio.run(main())
