"""A damaged index gives one clear line naming the index and what is wrong, never a traceback,
NaN or a silently wrong ranking: through ``blipitm search``, ``blipitm index verify`` and
``blipitm serve --index`` (which refuses to start). Checksums make size-preserving damage
visible; non-finite vectors are refused when added."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.errors import InvalidInputError
from blipitm.retrieval import Index, NewItem, build_index
from server_helpers import ServerProcess, free_port


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


@pytest.fixture(scope="module")
def pristine(engine: blipitm.Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An intact index with stored features: 5 images (two batches) and 3 captions."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "photos").mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        pixels = rng.integers(0, 256, (24 + 2 * i, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "photos" / f"p{i}.png")
    lines = [{"text": t, "n": i} for i, t in enumerate(["a dog", "a red car", "a beach"])]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    index, _ = build_index(
        engine, [root / "photos", root / "captions.jsonl"], root / "index", batch_size=3,
        store_features=True,
    )  # fmt: skip
    index.close()
    return root / "index"


@pytest.fixture
def idx(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of ``pristine`` to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "index"))


def _sql(statement: str) -> Callable[[Path], None]:
    def damage(idx: Path) -> None:
        db = sqlite3.connect(idx / "index.sqlite")
        db.execute(statement)
        db.commit()
        db.close()

    return damage


def _manifest(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(idx: Path) -> None:
        manifest = json.loads((idx / "manifest.json").read_text())
        (idx / "manifest.json").write_text(json.dumps(edit(manifest) or manifest, indent=2))

    return damage


def _embeddings(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Rewrite embeddings.f32 in place, same size."""

    def damage(idx: Path) -> None:
        dim = json.loads((idx / "manifest.json").read_text())["embedding_dim"]
        emb = np.fromfile(idx / "embeddings.f32", np.float32).reshape(-1, dim)
        np.ascontiguousarray(change(emb), dtype=np.float32).tofile(idx / "embeddings.f32")

    return damage


def _garbage(idx: Path) -> None:
    db = idx / "index.sqlite"
    db.write_bytes(np.random.default_rng(0).bytes(db.stat().st_size))


def _truncate(idx: Path) -> None:
    db = idx / "index.sqlite"
    os.truncate(db, db.stat().st_size // 2)


def _remove(idx: Path) -> None:
    shutil.rmtree(idx)


# name -> (damage, what the one line must say)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "sqlite-garbage": (_garbage, r"index\.sqlite is damaged \(file is not a database\)"),
    "sqlite-truncated": (_truncate, r"index\.sqlite is damaged \(database disk image is malformed"),
    "sqlite-missing-table": (_sql("DROP TABLE items"), r"damaged \(no such table: items\)"),
    "manifest-not-json": (
        lambda idx: (idx / "manifest.json").write_text('{"format": "blipitm-index",'),
        r"manifest\.json is not valid JSON",
    ),
    "manifest-a-list": (_manifest(lambda m: [m]), r"manifest\.json holds a list, not an object"),
    "manifest-missing-keys": (_manifest(lambda m: m.pop("model") and m), r"'model' is missing"),
    "metadata-not-json": (
        _sql("UPDATE items SET metadata = '{\"n\": 1' WHERE kind = 'text'"),
        r"the metadata of item \d+ is not a JSON object",
    ),
    "embeddings-nan": (
        _embeddings(lambda e: np.full_like(e, np.nan)),
        r"embeddings\.f32 rows 0\.\.2 do not match their checksum",
    ),
    "embeddings-zeroed": (
        _embeddings(np.zeros_like),
        r"embeddings\.f32 rows 0\.\.2 do not match their checksum",
    ),
    "embeddings-rows-reversed": (
        _embeddings(lambda e: e[::-1]),
        r"embeddings\.f32 rows 0\.\.2 do not match their checksum",
    ),
    "manifest-embedding-dim": (
        _manifest(lambda m: m.update(embedding_dim=m["embedding_dim"] // 2)),
        r"'embedding_dim' \d+ differs from 'model\.embedding_dim'",
    ),
    "manifest-protocol": (
        _manifest(lambda m: m["model"].update(protocol="transformers")),
        r"manifest\.json is not the one written when the index was built",
    ),
    "missing": (_remove, r"does not exist"),
}


def _one_line(err: str, idx: Path, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"blipitm: error: index {idx}"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_one_line_through_the_cli(
    kind: str, idx: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, pattern = DAMAGE[kind]
    damage(idx)
    for argv in (
        ["search", str(idx), "a dog", "--json"],
        ["search", str(idx), "a dog", "--model", str(tiny_ckpt)],  # with an explicit model too
        ["index", "verify", str(idx)],
        ["index", "info", str(idx)],
    ):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "", argv  # no results, and never a NaN
        _one_line(err, idx, pattern)


# What the issue saw go wrong in the server; every other kind fails in the same Index.open.
SERVE_KINDS = ["sqlite-garbage", "metadata-not-json", "embeddings-nan", "manifest-embedding-dim"]


@pytest.mark.parametrize("kind", [*SERVE_KINDS, "missing"])
def test_damage_stops_serve(kind: str, idx: Path, tiny_ckpt: Path) -> None:
    damage, pattern = DAMAGE[kind]
    damage(idx)
    port = free_port()
    argv = ["-m", "blipitm.cli.main", "serve", "--model", str(tiny_ckpt), "--host", "127.0.0.1"]
    server = ServerProcess([*argv, "--port", str(port), "--index", str(idx)], port)
    try:  # fails fast if the server comes up "ready" instead of refusing
        with pytest.raises(RuntimeError, match=r"server exited with [1-9]"):
            server.wait_ready(timeout=120)
    finally:
        server.stop()
    said = server.output()
    assert re.search(f"index {re.escape(str(idx))}.*{pattern}", said), said


def test_verify_checks_the_features_open_does_not_read(
    idx: Path, engine: blipitm.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "verify", str(idx)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{idx}: ok (8 rows and 5 feature rows in 3 batches")
    # Rows reversed inside the second image batch: same bytes, same size, other order.
    with Index.open(idx) as index:
        t, d = index.feature_shape
    feats = np.fromfile(idx / "features.f16", np.float16).reshape(-1, t, d)
    feats[3:5] = feats[3:5][::-1].copy()
    feats.tofile(idx / "features.f16")
    Index.open(idx, engine).close()  # open reads only what is cheap ...
    assert main(["index", "verify", str(idx)]) == 2  # ... verify reads everything
    _one_line(
        capsys.readouterr().err, idx, r"features\.f16 rows 3\.\.4 do not match their checksum"
    )


def test_non_finite_vectors_are_refused_when_added(idx: Path, engine: blipitm.Engine) -> None:
    with Index.open(idx, engine, writable=True) as index:
        before, size = index.committed(), (idx / "embeddings.f32").stat().st_size
        texts = [NewItem("text", f"t{i}", text=f"caption {i}") for i in range(3)]
        emb = engine.embed_texts([t.text or "" for t in texts])
        emb[1, 7] = np.nan
        with pytest.raises(InvalidInputError, match=r"embeddings: items \[1\] .*non-finite"):
            index.append(texts, emb)
        image = [NewItem("image", "i0", path="i0.png")]
        t, d = index.feature_shape
        feats = np.zeros((1, t, d), np.float32)
        feats[0, 0, 0] = 1e6  # finite in float32, inf once stored as float16
        with pytest.raises(InvalidInputError, match=r"features: items \[0\] .*non-finite"):
            index.append(image, engine.embed_texts(["x"]), feats)
        assert index.committed() == before
        assert (idx / "embeddings.f32").stat().st_size == size
    assert main(["index", "verify", str(idx)]) == 0


def test_an_index_without_checksums_must_be_rebuilt(
    idx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _manifest(lambda m: m.update(format_version=1))(idx)
    assert main(["search", str(idx), "a dog"]) == 2
    _one_line(
        capsys.readouterr().err, idx, r"format version 1, .*rebuild it with 'blipitm index build"
    )
