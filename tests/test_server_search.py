"""``blipitm serve --index``: POST /v1/search against a real server process equals
``blipitm.retrieval.search`` in-process; a mismatched index stops the server at start-up; results
never show the server's absolute paths; an index damaged while serving answers 503, never 500."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.retrieval import Index, build_index, search
from server_helpers import REPO, ServerProcess, cli_server, data_uri, free_port, png_bytes

CAPTIONS = ["a red square", "a dog on the grass", "two people on a beach", "a blue car", "snow"]


@pytest.fixture(scope="module")
def index_dir(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    index, _ = build_index(blipitm.load(tiny_ckpt), [photos, root / "captions.txt"], root / "index")
    index.close()
    return root / "index"


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, index_dir: Path) -> Iterator[ServerProcess]:
    with cli_server(tiny_ckpt, "--index", str(index_dir)) as s:
        yield s


def test_text_query_finds_images(server: ServerProcess, tiny_ckpt: Path, index_dir: Path) -> None:
    r = httpx.post(
        server.url + "/v1/search",
        json={"query": "a dog on the grass", "top_k": 3, "rerank_k": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    engine = blipitm.load(tiny_ckpt)
    want = search(engine, Index.open(index_dir, engine), "a dog on the grass", top_k=3, rerank_k=4)
    assert [d["id"] for d in body["data"]] == [h.id for h in want]
    assert all(d["kind"] == "image" and d["object"] == "search_result" for d in body["data"])
    np.testing.assert_allclose([d["score"] for d in body["data"]], [h.score for h in want], 1e-5)
    assert body["usage"]["prompt_tokens"] > 0
    # The query's tokens as search() counted them while embedding it: no second tokenization.
    assert want.text_tokens == engine.count_tokens(["a dog on the grass"])[0]
    assert body["usage"]["prompt_tokens"] == want.text_tokens


def test_image_query_finds_captions(
    server: ServerProcess, tiny_ckpt: Path, index_dir: Path
) -> None:
    image = png_bytes((200, 40, 40))
    r = httpx.post(
        server.url + "/v1/search",
        json={"query": {"type": "image_url", "image_url": {"url": data_uri(image)}}, "top_k": 5},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    engine = blipitm.load(tiny_ckpt)
    want = search(engine, Index.open(index_dir, engine), image, top_k=5, rerank_k=128)
    got = r.json()["data"]
    assert [d["text"] for d in got] == [h.text for h in want]
    np.testing.assert_allclose([d["itc_cosine"] for d in got], [h.itc_cosine for h in want], 1e-5)


def test_search_argument_errors(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/search", json={"query": "x", "top_k": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = httpx.post(server.url + "/v1/search", json={"query": "x", "rerank_k": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "rerank_k"


def test_without_index_search_is_404(tiny_ckpt: Path) -> None:
    with cli_server(tiny_ckpt) as s:
        r = httpx.post(s.url + "/v1/search", json={"query": "a dog"}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "index_not_configured"


def test_mismatched_index_stops_the_server(tiny_ckpt: Path, index_dir: Path) -> None:
    argv = [sys.executable, "-m", "blipitm.cli.main", "serve", "--model", str(tiny_ckpt)]
    argv += ["--protocol", "transformers", "--index", str(index_dir), "--port", str(free_port())]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # a start-up failure: one line, exit 2
    assert "protocol" in proc.stdout + proc.stderr


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_results_show_paths_relative_to_the_indexed_root(
    server: ServerProcess, index_dir: Path
) -> None:
    r = httpx.post(
        server.url + "/v1/search", json={"query": "a dog", "top_k": 6, "rerank_k": 0}, timeout=60
    )
    assert r.status_code == 200, r.text
    # the indexed folder's name, then the path inside it: no server path before that
    assert sorted(d["path"] for d in r.json()["data"]) == [f"photos/p{i}.png" for i in range(6)]
    # (the top-level "model" echoes the served model name: the /v1/models part of item 8)
    root = str(index_dir.parent)
    assert not [s for s in _strings(r.json()["data"]) if s.startswith("/") or root in s]


def test_index_damaged_while_serving_is_503_not_500(tiny_ckpt: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (photos / f"p{i}.png").write_bytes(png_bytes(color))
    idx = tmp_path / "index"
    build_index(blipitm.load(tiny_ckpt), photos, idx)[0].close()
    emb_file = idx / "embeddings.f32"
    intact = emb_file.read_bytes()
    with cli_server(tiny_ckpt, "--index", str(idx)) as server:

        def damaged() -> bool:
            r = httpx.post(server.url + "/v1/search", json={"query": "a dog"}, timeout=60)
            assert str(tmp_path) not in r.text  # details (with server paths) go to the log
            if r.status_code == 200:
                return False
            assert r.status_code == 503 and r.json()["error"]["code"] == "index_damaged", r.text
            return True

        assert not damaged()
        # NaN written over the vectors (same size): never NaN in JSON, never a 500
        np.full(len(intact) // 4, np.nan, np.float32).tofile(emb_file)
        assert damaged()
        emb_file.write_bytes(intact)
        assert not damaged()
        # an indexed image deleted: the client's query is fine, so not a 400 either
        (photos / "p1.png").unlink()
        assert damaged()
        # an item's metadata no longer JSON
        db = sqlite3.connect(idx / "index.sqlite")
        db.execute("UPDATE items SET metadata = '{broken' WHERE kind = 'image'")
        db.commit()
        db.close()
        assert damaged()
    log = server.output()
    assert f"index {idx}: the embedding at row 0 is NaN or inf" in log
    assert f"index {idx}: an indexed image can no longer be read" in log
    assert f"index {idx}: the metadata of item" in log
