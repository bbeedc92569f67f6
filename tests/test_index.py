"""Retrieval index: build / add / remove / info, search equal to brute force (Engine.rank),
SIGKILL mid-build then resume, unreadable files skipped, and a mismatched model refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.retrieval import (
    Index,
    IndexMismatchError,
    build_index,
    search,
)
from blipitm.testing.make_checkpoint import make_checkpoint

CAPTIONS = [
    "a dog on the grass",
    "a red car parked outside",
    "two people walking on a beach",
    "a cat sleeping on a sofa",
    "the sky at night with stars",
    "a bowl of fruit on a table",
]


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 readable images (one in a subfolder), one corrupt file, one non-image file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "nested").mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        name = f"nested/n{i}.jpg" if i == 5 else f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 4 * i, 44, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "notes.md").write_text("not an image")
    return root


def image_paths(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.rglob("*") if p.name.startswith(("p", "n")) and
                  p.suffix in (".png", ".jpg"))  # fmt: skip


def check_text_search(engine: blipitm.Engine, index: Index, live: list[Path], **kw: int) -> None:
    for query in CAPTIONS[:3]:
        hits = search(engine, index, query, **kw)
        want = engine.rank_images(query, live, **kw)
        assert [h.file for h in hits] == [str(live[r.index]) for r in want]
        np.testing.assert_allclose([h.score for h in hits], [r.score for r in want], atol=1e-5)
        np.testing.assert_allclose(
            [h.itm_probability for h in hits], [r.itm_probability for r in want], atol=1e-5
        )
        np.testing.assert_allclose(
            [h.itc_cosine for h in hits], [r.itc_cosine for r in want], atol=1e-6
        )


def test_build_search_add_remove(
    engine: blipitm.Engine, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:4]) + "\n\n")
    out = tmp_path / "idx"
    index, report = build_index(engine, [photos, captions], out, batch_size=3)
    with index:
        assert report.added == 8 + 4
        assert [Path(s).name for s, _ in report.skipped] == ["broken.png"]
        assert index.counts() == {"image": 8, "text": 4, "removed": 0}
        live = image_paths(photos)
        check_text_search(engine, index, live, top_k=5, rerank_k=6)
        check_text_search(engine, index, live, top_k=3, rerank_k=128)
        # image -> captions
        hits = search(engine, index, live[2], top_k=4, rerank_k=4)
        want = engine.rank_texts(live[2], CAPTIONS[:4], top_k=4, rerank_k=4)
        assert [h.text for h in hits] == [CAPTIONS[r.index] for r in want]
        np.testing.assert_allclose([h.score for h in hits], [r.score for r in want], atol=1e-5)
        # ITC only: cosine order over all images
        itc = search(engine, index, CAPTIONS[0], top_k=8, rerank_k=0)
        cos = engine.embed_images(live) @ engine.embed_texts([CAPTIONS[0]])[0]
        assert [h.file for h in itc] == [str(live[j]) for j in np.argsort(-cos, kind="stable")]
        # what results show: the indexed folder's name, then the path inside it
        want_paths = {f"{photos.name}/{p.relative_to(photos).as_posix()}" for p in live}
        assert {h.path for h in itc} == want_paths
        assert all(h.itm_probability is None for h in itc)

        # remove by id and by path; removed items never come back
        first = next(h for h in search(engine, index, CAPTIONS[0], top_k=1, rerank_k=8))
        removed, missing = index.remove([first.id, str(live[0]), "no/such/thing"])
        assert {r.path for r in removed} == {first.file, str(live[0])} and missing == [
            "no/such/thing"
        ]
        remaining = [p for p in live if str(p) not in {first.file, str(live[0])}]
        check_text_search(engine, index, remaining, top_k=8, rerank_k=8)

    # add more (CLI), including items already present: only the new ones are embedded
    more = tmp_path / "more.jsonl"
    extra = tmp_path / "extra.png"
    Image.fromarray(np.full((20, 20, 3), 200, dtype=np.uint8)).save(extra)
    more.write_text(
        json.dumps({"image": "extra.png", "album": "x"}) + "\n" + json.dumps({"text": CAPTIONS[5]})
        + "\n{broken json\n"
    )  # fmt: skip
    model = str(engine.info.source)
    assert main(["index", "add", str(out), str(more), str(photos), "--model", model,
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "added 2, already indexed 6" in text and "invalid JSON" in text
    assert "2 items were removed earlier and were not re-added" in text
    with Index.open(out, engine) as index:
        remaining.append(extra.resolve())
        check_text_search(engine, index, remaining, top_k=8, rerank_k=8)
        hit = search(engine, index, CAPTIONS[0], top_k=8, rerank_k=8)
        added = next(h for h in hit if h.file == str(extra.resolve()))
        assert added.metadata == {"album": "x"} and added.path == "extra.png"  # JSONL-relative

    # info and search through the CLI
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["images"], info["texts"], info["removed"]) == (7, 5, 2)
    assert sorted(Path(s["source"]).name for s in info["skipped"]) == ["broken.png", "more.jsonl:3"]
    assert main(["search", str(out), CAPTIONS[1], "--top-k", "3", "--json", "--model",
                 str(engine.info.source)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Index.open(out, engine) as index:
        want = search(engine, index, CAPTIONS[1], top_k=3)
    assert [r["id"] for r in rows] == [h.id for h in want] and rows[0]["rank"] == 1
    assert {"score", "itm_probability", "itc_cosine", "path"} <= set(rows[0])
    # the same relative paths as the server shows; no absolute path of this machine
    assert [r["path"] for r in rows] == [h.path for h in want] and "file" not in rows[0]
    assert all(str(tmp_path) not in line for line in map(json.dumps, rows))
    # Without --model the index's own model (source, protocol, dtype) is loaded.
    assert main(["search", str(out), CAPTIONS[1], "--top-k", "3", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_stored_features_rerank_without_reencoding(
    engine: blipitm.Engine, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = build_index(engine, photos, tmp_path / "idx", store_features=True)
    live = image_paths(photos)
    with index:
        assert index.has_features
        want = engine.rank_images(CAPTIONS[0], live, top_k=8, rerank_k=8)
        # every image must come from the stored tokens: reading any file now fails
        monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
        hits = search(engine, index, CAPTIONS[0], top_k=8, rerank_k=8)
    got = {h.file: h for h in hits}
    # float16 tokens: close to the float32 scores, not equal. Measured on the tiny checkpoint over
    # 6 captions x 8 images: score error <= 4.7e-5, ITM probability <= 1.9e-5; the cosine comes
    # from the float32 embeddings and is exact.
    for r in want:
        h = got[str(live[r.index])]
        assert abs(h.score - r.score) < 1e-4
        assert h.itm_probability is not None and abs(h.itm_probability - r.itm_probability) < 5e-5
        assert h.itc_cosine == pytest.approx(r.itc_cosine, abs=1e-6)


KILLER = """
import os, signal, sys
from blipitm.retrieval import arrays
calls = []
original = arrays.write_at
def write_at(path, offset, data):
    original(path, offset, data)  # the batch reaches the embeddings file ...
    calls.append(path)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # ... but its rows are never committed
arrays.write_at = write_at
from blipitm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_build_then_resume(
    engine: blipitm.Engine, tiny_ckpt: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    args = ["index", "build", str(photos), "--out", str(out), "--batch-size", "2"]
    args += ["--model", str(tiny_ckpt)]
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    # sorted sources: [broken.png, nested/n5.jpg], [p0, p1] committed (3 rows), [p2, p3] torn
    with Index.open(out) as index:  # a reader sees the committed rows only
        assert index.committed() == (3, 0) and len(index.embeddings()) == 3
    assert (out / "embeddings.f32").stat().st_size == 5 * 256 * 4
    assert main([*args, "--no-progress"]) == 0  # resume
    live = image_paths(photos)
    with Index.open(out, engine) as index:
        assert (out / "embeddings.f32").stat().st_size == 8 * 256 * 4
        items = list(index.items())
        assert sorted(it.path for it in items) == sorted(str(p) for p in live)  # each once
        emb = index.embeddings()
        want = engine.embed_images([Path(it.path) for it in items])
        np.testing.assert_allclose(emb[[it.row for it in items]], want, atol=1e-6)
        check_text_search(engine, index, live, top_k=8, rerank_k=8)


def test_mismatched_model_is_refused(
    engine: blipitm.Engine,
    tiny_ckpt: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    index, _ = build_index(engine, photos, tmp_path / "idx")
    index.close()
    other = blipitm.load(make_checkpoint(tmp_path / "seed1", preset="tiny", seed=1))
    with pytest.raises(IndexMismatchError, match="different model weights"):
        Index.open(tmp_path / "idx", other)
    hf = blipitm.load(tiny_ckpt, protocol="transformers")
    with pytest.raises(IndexMismatchError, match=r"protocol 'blip'.*--protocol blip"):
        Index.open(tmp_path / "idx", hf)
    code = main(["search", str(tmp_path / "idx"), "a dog", "--model", str(tiny_ckpt),
                 "--protocol", "transformers"])  # fmt: skip
    assert code == 2 and "cannot use index" in capsys.readouterr().err
    # the same weights in another dtype are the same model
    bf16 = blipitm.load(tiny_ckpt, dtype="bfloat16")
    Index.open(tmp_path / "idx", bf16).close()


def test_relative_model_path_is_recorded_absolute(
    tiny_ckpt: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "idx"
    monkeypatch.chdir(tiny_ckpt.parent)
    build = ["index", "build", str(photos), "--out", str(out), "--no-progress"]
    assert main([*build, "--model", f"./{tiny_ckpt.name}"]) == 0
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["source"] == str(tiny_ckpt.resolve())
    monkeypatch.chdir(tmp_path)  # the index's own model is found from anywhere
    capsys.readouterr()
    assert main(["search", str(out), CAPTIONS[0], "--top-k", "2", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("query", [[], ["a dog", "--image", "dog.png"]])
def test_search_usage_errors_exit_2(query: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "any.index", *query]) == 2
    assert capsys.readouterr().err == (
        "blipitm: error: query: give either a caption or --image PATH\n"
    )
