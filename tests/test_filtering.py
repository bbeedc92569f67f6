"""blipitm filter, local pipeline: inputs, scores, statuses, the cut, outputs, resume."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.filtering import (
    By,
    FilterError,
    KeepFraction,
    LocalRun,
    RayRun,
    Threshold,
    filter_dataset,
)
from blipitm.filtering.inputs import expand_braces
from blipitm.testing.make_checkpoint import make_checkpoint

CAPTIONS = ["a dog on the grass", "a red car", "a cat on a sofa", "two people on a beach"]


def jpeg(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json, consecutive per key."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__'].decode()}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, seed: int, caption: str) -> dict[str, bytes]:
    return {
        "__key__": key.encode(),
        "jpg": jpeg(seed),
        "txt": caption.encode(),
        "json": json.dumps({"key": key, "url": f"http://x/{key}.jpg"}).encode(),
    }


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(str(tiny_ckpt))


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    out = []
    for k in range(3):
        rows = [sample(f"{k:05d}{i:04d}", 10 * k + i, CAPTIONS[i % 4]) for i in range(4)]
        out.append(write_tar(tmp_path / f"{k:05d}.tar", rows))
    return out


def scores_of(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet")))


def test_wds_scores_equal_engine_and_outputs_read_back(
    engine: blipitm.Engine, shards: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stats = filter_dataset(
        [str(tmp_path / "{00000..00002}.tar")], out, KeepFraction(0.5), model=engine
    )
    table = scores_of(out)
    assert table.num_rows == 12 and set(table["status"].to_pylist()) == {"ok"}
    for r in table.to_pylist():
        shard = int(r["id"][:5])
        i = int(r["id"][5:])
        want = engine.score(jpeg(10 * shard + i), r["caption"])
        assert r["caption"] == CAPTIONS[i % 4]
        assert abs(r["itm_probability"] - want.itm_probability[0]) < 1e-6
        assert abs(r["itc_cosine"] - want.itc_cosine[0]) < 1e-6
        assert abs(r["itm_logit"] - want.itm_logits[0, 1]) < 1e-6
    assert sum(table["kept"].to_pylist()) == 6 == stats.kept_samples
    # Kept shards: readable by webdataset, original bytes untouched, scores added.
    kept = list(
        wds.WebDataset([str(p) for p in sorted((out / "kept").glob("*.tar"))], shardshuffle=False)
    )
    assert len(kept) == 6
    for s in kept:
        shard, i = int(s["__key__"][:5]), int(s["__key__"][5:])
        assert s["jpg"] == jpeg(10 * shard + i)
        assert s["txt"].decode() == CAPTIONS[i % 4]
        scores = json.loads(s["scores.json"])
        assert scores["itm_probability"] >= stats.threshold
    saved = json.loads((out / "stats.json").read_text())
    assert saved["samples"] == 12 and saved["kept_pairs"] == 6
    assert set(saved["quantiles"]) == {"itm_probability", "itm_logit", "itc_cosine", "blip_score"}
    assert (out / "histogram.png").read_bytes().startswith(b"\x89PNG")


def test_keep_fraction_exact_count_and_deterministic_ties(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    # Three distinct pairs, each repeated: the scores tie in groups of four.
    rows = [sample(f"s{i:03d}", i % 3, "a dog") for i in range(12)]
    write_tar(tmp_path / "a.tar", rows[:5])
    write_tar(tmp_path / "b.tar", rows[5:])
    for fraction in (0.3, 0.35, 0.5, 1.0, 0.0):
        out = tmp_path / f"out-{fraction}"
        filter_dataset(
            [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
            out,
            KeepFraction(fraction, by="itc"),
            model=engine,
            write="scores",
        )
        t = pq.read_table(out / "scores" / "a.parquet")
        t = pa.concat_tables([t, pq.read_table(out / "scores" / "b.parquet")])
        score = np.asarray(t["itc_cosine"].to_pylist())
        kept = np.asarray(t["kept"].to_pylist())
        k = math.ceil(round(fraction * 12, 9))
        assert kept.sum() == k
        want = np.lexsort((np.arange(12), -score))[:k]  # best first, earlier rows win ties
        assert sorted(np.flatnonzero(kept)) == sorted(want)


def test_capfilt_lists_csv_jsonl_paths_and_bad_samples(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(jpeg(i))
    (imgs / "trunc.jpg").write_bytes(jpeg(7)[:200])
    (imgs / "junk.jpg").write_bytes(b"not an image at all")
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"key": "p0", "jpg": jpeg(0), "caption": ["a dog", "a red car", "a cat"]},
                {"key": "p1", "jpg": jpeg(1), "caption": ["a beach"]},
                {"key": "p2", "jpg": None, "caption": ["no image here"]},
                {"key": "p3", "jpg": b"\xff\xd8garbage", "caption": ["corrupt"]},
                {"key": "p4", "jpg": jpeg(2), "caption": ["", "fine caption"]},
            ]
        ),
        tmp_path / "t.parquet",
    )
    (tmp_path / "t.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "j0", "path": "imgs/0.jpg", "text": "a dog"},
                {"id": "j1", "path": "imgs/missing.jpg", "text": "a dog"},
                {"id": "j2", "path": "imgs/trunc.jpg", "text": "a dog"},
            ]
        )
        + "\n"
    )
    (tmp_path / "t.csv").write_text(
        'id,path,text\nc0,imgs/1.jpg,"[""a cat"", ""two cats""]"\nc1,imgs/junk.jpg,a dog\n'
    )
    out = tmp_path / "out"
    filter_dataset(
        [str(tmp_path / "t.parquet")], out, Threshold(0.0), model=engine, run=LocalRun(2)
    )
    t = pq.read_table(out / "scores" / "t.parquet").to_pylist()
    got = [(r["id"], r["candidate"], r["status"]) for r in t]
    assert got == [
        ("p0", 0, "ok"),
        ("p0", 1, "ok"),
        ("p0", 2, "ok"),
        ("p1", 0, "ok"),
        ("p2", 0, "missing_image"),
        ("p3", 0, "bad_image"),
        ("p4", 0, "bad_caption"),
        ("p4", 1, "ok"),
    ]
    p0 = engine.score(jpeg(0), ["a dog", "a red car", "a cat"])
    np.testing.assert_allclose([r["itm_probability"] for r in t[:3]], p0.itm_probability, atol=1e-6)
    assert all(r["itm_probability"] is None for r in t if r["status"] != "ok")  # NULL
    assert all(r["error"] for r in t if r["status"] != "ok")
    kept = pq.read_table(out / "kept" / "t.parquet").to_pylist()
    assert [r["key"] for r in kept] == ["p0", "p1", "p4"]
    assert kept[0]["captions_kept"] == ["a dog", "a red car", "a cat"]
    assert kept[0]["caption"] == ["a dog", "a red car", "a cat"]  # original fields untouched
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status_pairs"] == {"bad_caption": 1, "bad_image": 1, "missing_image": 1, "ok": 5}
    assert {e["id"] for e in stats["errors"]} == {"p2", "p3", "p4"}

    out2 = tmp_path / "out2"
    args = ["--image-col", "path", "--caption-col", "text", "--id-col", "id"]
    code = main(
        [
            *["filter", str(tmp_path / "t.jsonl"), str(tmp_path / "t.csv"), "--out", str(out2)],
            *["--threshold", "0", "--model", str(engine.info.source), *args],
        ]
    )
    assert code == 0
    rows = scores_of(out2).to_pylist()
    assert [(r["id"], r["status"]) for r in rows] == [
        ("c0", "ok"),
        ("c0", "ok"),
        ("c1", "bad_image"),
        ("j0", "ok"),
        ("j1", "bad_image"),
        ("j2", "bad_image"),
    ]
    assert "no such image file" in rows[4]["error"] or "missing" in rows[4]["error"]
    want = engine.score(imgs / "1.jpg", ["a cat", "two cats"]).itm_probability
    np.testing.assert_allclose([r["itm_probability"] for r in rows[:2]], want, atol=1e-6)


def test_a_bad_shard_is_an_error_line_not_a_crash(
    engine: blipitm.Engine, shards: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.tar").write_bytes(shards[0].read_bytes()[:1500])
    out = tmp_path / "out"
    code = main(
        [
            *["filter", str(shards[1]), str(tmp_path / "broken.tar"), "--out", str(out)],
            *["--threshold", "0.5", "--model", str(engine.info.source)],
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.tar" in err and "error" in err
    assert (out / "scores" / "00001.done.json").exists()
    assert not (out / "scores" / "broken.parquet").exists()
    assert json.loads((out / "stats.json").read_text())["shard_errors"][0]["shard"].endswith(
        "broken.tar"
    )


def test_identical_images_are_encoded_once(tiny_ckpt: Path, tmp_path: Path) -> None:
    engine = blipitm.load(str(tiny_ckpt))
    encoded = []
    real = engine.model.encode_image

    def counting(pixels):  # type: ignore[no-untyped-def]
        encoded.append(int(pixels.shape[0]))
        return real(pixels)

    engine.model.encode_image = counting  # type: ignore[method-assign]
    write_tar(tmp_path / "d.tar", [sample(f"k{i}", i % 2, CAPTIONS[i % 4]) for i in range(8)])
    filter_dataset(
        [str(tmp_path / "d.tar")], tmp_path / "out", Threshold(0.5), model=engine, run=LocalRun(3)
    )
    assert sum(encoded) == 1 + 2  # the manifest's identity probe, then the two distinct images


KILLER = """
import os, signal, sys
import blipitm
from blipitm.engine import LoadOptions
from blipitm.filtering import LocalRun, Threshold, filter_dataset

def progress(p):
    if p.shard == 2:  # mid-shard: after its first batch
        os.kill(os.getpid(), signal.SIGKILL)

filter_dataset(sys.argv[2:], sys.argv[1], Threshold(0.5), model=LoadOptions(os.environ["MODEL"]),
               run=LocalRun(2), progress=progress)
"""


def test_resume_after_sigkill_mid_shard(
    engine: blipitm.Engine, shards: list[Path], tiny_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "MODEL": str(tiny_ckpt)}
    done = subprocess.run(
        [sys.executable, str(script), str(out), *map(str, shards)], env=env, timeout=300
    )
    assert done.returncode == -signal.SIGKILL
    markers = sorted(p.name for p in (out / "scores").glob("*.done.json"))
    assert markers == ["00000.done.json", "00001.done.json"]
    assert not (out / "scores" / "00002.parquet").exists()
    before = {m: (out / "scores" / m).stat().st_mtime_ns for m in markers}

    seen: list[tuple[int, int]] = []
    filter_dataset(
        list(map(str, shards)),
        out,
        Threshold(0.5),
        model=engine,
        run=LocalRun(2),
        progress=lambda p: seen.append((p.shard, p.samples)),
    )
    assert {s for s, _ in seen} == {2}  # finished shards are not redone
    assert seen[-1][1] == 4  # the interrupted shard is redone whole
    assert {m: (out / "scores" / m).stat().st_mtime_ns for m in markers} == before
    fresh = tmp_path / "fresh"
    filter_dataset(list(map(str, shards)), fresh, Threshold(0.5), model=engine, run=LocalRun(2))
    a, b = scores_of(out), scores_of(fresh)
    for name in a.column_names:
        if name in ("itm_probability", "itm_logit", "itc_cosine", "blip_score"):
            np.testing.assert_allclose(a[name].to_numpy(), b[name].to_numpy(), atol=1e-6)
        else:
            assert a[name].to_pylist() == b[name].to_pylist(), name

    # Another model, or changed inputs: refused with a message; --restart starts over.
    other = blipitm.load(str(make_checkpoint(tmp_path / "other", preset="tiny", seed=1)))
    with pytest.raises(FilterError, match="different model weights"):
        filter_dataset(list(map(str, shards)), out, Threshold(0.5), model=other)
    write_tar(shards[1], [sample("0000100", 99, "changed")])
    with pytest.raises(FilterError, match=r"00001\.tar changed"):
        filter_dataset(list(map(str, shards)), out, Threshold(0.5), model=engine)
    stats = filter_dataset(list(map(str, shards)), out, Threshold(0.5), model=engine, restart=True)
    assert stats.samples == 9


def test_expand_braces() -> None:
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{1..2}-{0..1}") == ["1-0", "1-1", "2-0", "2-1"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    """What keeps a long filtering run's RSS flat (``score_batch`` calls it after each batch):
    64 KiB blocks come from the heap, and with one live block above them glibc keeps the freed
    ones resident until they are trimmed."""
    code = """
import numpy as np
from blipitm.common.memory import release_free_memory
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
blocks = [np.ones(8192) for _ in range(2000)]  # 2000 x 64 KiB, touched
top = blocks.pop()
del blocks
before = rss()
assert release_free_memory()
print(before - rss())
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(got.stdout) > 100  # MB given back, of the 125 MB freed


def test_policies_and_runs_are_checked_when_built(tmp_path: Path) -> None:
    with pytest.raises(blipitm.InvalidInputError, match="by must be one of"):
        Threshold(0.5, by="clip")
    with pytest.raises(blipitm.InvalidInputError, match=r"in \[0, 1\]"):
        KeepFraction(1.5)
    with pytest.raises(blipitm.InvalidInputError, match="batch_size"):
        LocalRun(0)
    with pytest.raises(blipitm.InvalidInputError, match="workers"):
        RayRun(workers=0)
    with pytest.raises(blipitm.InvalidInputError, match="Threshold or a KeepFraction"):
        filter_dataset(["x.tar"], tmp_path / "out", 0.5)  # type: ignore[arg-type]
    with pytest.raises(blipitm.InvalidInputError, match="LoadOptions"):
        filter_dataset(["x.tar"], tmp_path / "out", Threshold(0.5), model="some/model")  # type: ignore[arg-type]
    assert Threshold(0.5, by="itc") == Threshold(0.5, By.ITC) and Threshold(1).by is By.ITM
