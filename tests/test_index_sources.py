"""Issue 18 items 11, 14, 16 and 21, index parts: what ``index build`` reads and refuses.

A build onto an existing index only resumes it; images of two folders are told apart in results;
a malformed (deeply nested) JSONL line, a FIFO, a symlink to /dev/zero or an oversized file is a
skipped, listed item, never a traceback, a hang or a memory blow-up; non-image files are counted;
POST /v1/search on an index without the other modality is a 400."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.retrieval import Index, build_index, list_source, search
from blipitm.server.app import create_app
from blipitm.server.settings import ServerSettings
from server_helpers import data_uri, png_bytes


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def cli_build(tiny_ckpt: Path, out: Path, *sources: Path) -> int:
    argv = ["index", "build", *map(str, sources), "--out", str(out), "--no-progress"]
    return main([*argv, "--model", str(tiny_ckpt)])


# -- item 11 -------------------------------------------------------------------------------------


def test_build_onto_an_existing_index_only_resumes_it(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "a" / "x.png", 0)
    write_image(tmp_path / "b" / "y.png", 1)
    out = tmp_path / "idx"
    assert cli_build(tiny_ckpt, out, tmp_path / "a") == 0
    capsys.readouterr()
    assert cli_build(tiny_ckpt, out, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert err.startswith("blipitm: error: ") and err.count("\n") == 1
    assert f"'blipitm index add {out} {tmp_path / 'b'}'" in err
    with Index.open(out) as index:
        assert index.counts()["image"] == 1  # nothing was added
    # The same sources resume (here: nothing left to do), wherever the command runs from.
    assert cli_build(tiny_ckpt, out, tmp_path / "a") == 0
    assert "added 0, already indexed 1" in capsys.readouterr().out


def test_results_tell_images_of_two_folders_apart(engine: blipitm.Engine, tmp_path: Path) -> None:
    write_image(tmp_path / "day1" / "x.png", 0)
    write_image(tmp_path / "day2" / "x.png", 1)
    write_image(tmp_path / "day2" / "sub" / "y.png", 2)
    index, _ = build_index(engine, [tmp_path / "day1", tmp_path / "day2"], tmp_path / "idx")
    with index:
        hits = search(engine, index, "a dog", top_k=3, rerank_k=0)
    assert sorted(h.path for h in hits) == ["day1/x.png", "day2/sub/y.png", "day2/x.png"]


def test_server_search_of_the_wrong_modality_is_400(
    engine: blipitm.Engine, tiny_ckpt: Path, tmp_path: Path
) -> None:
    write_image(tmp_path / "pics" / "a.png")
    build_index(engine, tmp_path / "pics", tmp_path / "idx")[0].close()
    settings = ServerSettings.of(model=str(tiny_ckpt), index=str(tmp_path / "idx"))

    async def go() -> tuple[httpx.Response, httpx.Response]:
        app = create_app(settings, lambda s: blipitm.load(tiny_ckpt))  # the app closes its own
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for _ in range(300):
                    if (await client.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                image = data_uri(png_bytes((200, 30, 30)))
                wrong = await client.post("/v1/search", json={"query": image})
                right = await client.post("/v1/search", json={"query": "a dog", "rerank_k": 0})
                return wrong, right

    wrong, right = asyncio.run(go())
    assert wrong.status_code == 400, wrong.text
    error = wrong.json()["error"]
    assert error["param"] == "query" and "holds no captions (it holds 1 image)" in error["message"]
    assert str(tmp_path) not in wrong.text
    assert right.status_code == 200 and len(right.json()["data"]) == 1


# -- item 14 -------------------------------------------------------------------------------------


def test_deeply_nested_jsonl_line_is_a_listed_skip(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"text": "a dog"}) + "\n" + "[" * 100_000 + "\n"
        + json.dumps({"text": "[" * 100_000}) + "\n"
    )  # fmt: skip
    listing = list_source(items)
    assert [it.text for it in listing.items] == ["a dog", "[" * 100_000]  # a string is fine
    assert [(Path(s).name, r.split(":")[0]) for s, r in listing.skipped] == [
        ("items.jsonl:2", "invalid JSON")
    ]
    assert cli_build(tiny_ckpt, tmp_path / "idx", items) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and "items.jsonl:2: invalid JSON" in out


# -- item 16 -------------------------------------------------------------------------------------


def test_fifo_in_an_indexed_folder_is_skipped_not_waited_for(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    write_image(tmp_path / "pics" / "a.png")
    fifo = tmp_path / "pics" / "b.jpg"
    os.mkfifo(fifo)
    done: list[object] = []

    def run() -> None:
        index, report = build_index(engine, tmp_path / "pics", tmp_path / "idx")
        index.close()
        done.append(report)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # the build waits for a writer: be one, so that the thread ends
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(10)
        pytest.fail("index build blocked on a FIFO")
    (report,) = done
    assert report.added == 1  # type: ignore[attr-defined]
    ((source, reason),) = report.skipped  # type: ignore[attr-defined]
    assert source == str(fifo.resolve()) and "is not a regular file (a FIFO)" in reason


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_skipped_without_reading_it(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "pics" / "a.png")
    (tmp_path / "pics" / "zero.png").symlink_to("/dev/zero")
    assert cli_build(tiny_ckpt, tmp_path / "idx", tmp_path / "pics") == 0
    out = capsys.readouterr().out
    assert "added 1" in out and "skipped /dev/zero:" in out and "(a device)" in out


def test_image_files_over_the_cap_are_skipped(
    engine: blipitm.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = write_image(tmp_path / "pics" / "a.png")
    big = write_image(tmp_path / "pics" / "b.png")
    with open(big, "ab") as f:
        f.write(b"\0" * 4096)
    monkeypatch.setattr("blipitm.retrieval.ingest.MAX_IMAGE_FILE_BYTES", small.stat().st_size)
    index, report = build_index(engine, tmp_path / "pics", tmp_path / "idx")
    index.close()
    assert report.added == 1
    ((source, reason),) = report.skipped
    assert source == str(big.resolve()) and "over the limit" in reason


# -- item 21 -------------------------------------------------------------------------------------


def test_non_image_files_of_a_folder_are_counted(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "pics" / "a.png")
    for name in ("notes.md", "data.csv", "sub/readme.txt"):
        (tmp_path / "pics" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pics" / name).write_text("x")
    (tmp_path / "pics" / ".DS_Store").write_text("hidden: not counted")
    assert list_source(tmp_path / "pics").ignored == 3
    assert cli_build(tiny_ckpt, tmp_path / "idx", tmp_path / "pics") == 0
    assert "ignored 3 files without an image extension" in capsys.readouterr().out
