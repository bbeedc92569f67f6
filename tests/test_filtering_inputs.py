"""blipitm filter: hostile and damaged inputs, two runs on one output folder, damaged
outputs of an earlier run, kept-sample schemas, caption statuses."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import blipitm
from blipitm.cli.main import main
from blipitm.filtering import (
    Columns,
    FilterError,
    Threshold,
    expand_inputs,
    filter_dataset,
    score_shard,
)
from blipitm.testing.make_checkpoint import make_checkpoint
from test_filtering import jpeg, sample, write_tar

DEEP = "[" * 100_000


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(str(tiny_ckpt))


def rows_of(out: Path, name: str) -> list[tuple[str, str]]:
    return [
        (r["id"], r["status"])
        for r in pq.read_table(out / "scores" / f"{name}.parquet").to_pylist()
    ]


def members(key: str, *items: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in items]


def raw_tar(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- deeply nested JSON ---------------------------------------------------------------------


def test_deeply_nested_json_is_a_status_row_not_a_crash(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "0.jpg").write_bytes(jpeg(0))
    # A .txt is a caption, whatever it looks like.
    write_tar(tmp_path / "txt.tar", [sample("a", 1, DEEP), sample("b", 2, "a dog")])
    out = tmp_path / "out-txt"
    filter_dataset([str(tmp_path / "txt.tar")], out, Threshold(0.5), model=engine)
    assert rows_of(out, "txt") == [("a", "ok"), ("b", "ok")]

    deep_meta = {**sample("a", 1, "x"), "json": b'{"caption": ' + DEEP.encode() + b"}"}
    good = {**sample("b", 2, "x"), "json": json.dumps({"caption": "a dog"}).encode()}
    write_tar(tmp_path / "meta.tar", [deep_meta, good])
    out = tmp_path / "out-meta"
    filter_dataset(
        [str(tmp_path / "meta.tar")],
        out,
        Threshold(0.5),
        model=engine,
        columns=Columns(caption="caption"),
    )
    assert rows_of(out, "meta") == [("a", "bad_caption"), ("b", "ok")]

    (tmp_path / "t.jsonl").write_text(
        DEEP + "\n" + json.dumps({"id": "j1", "path": "imgs/0.jpg", "text": "a dog"}) + "\n"
    )
    (tmp_path / "t.csv").write_text(f'id,path,text\nc0,imgs/0.jpg,"{DEEP}"\nc1,imgs/0.jpg,a dog\n')
    out = tmp_path / "out-tables"
    stats = filter_dataset(
        [str(tmp_path / "t.jsonl"), str(tmp_path / "t.csv")],
        out,
        Threshold(0.5),
        model=engine,
        columns=Columns(image="path", caption="text", id="id"),
    )
    assert rows_of(out, "t") == [("0", "bad_row"), ("j1", "ok")]
    assert rows_of(out, "t-2") == [("c0", "bad_caption"), ("c1", "ok")]
    assert stats.shard_errors == []


# -- paths in tables ------------------------------------------------------------------------

PATHS_SCRIPT = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from blipitm.engine import LoadOptions
from blipitm.filtering import Columns, Threshold, filter_dataset
filter_dataset([sys.argv[1]], sys.argv[2], Threshold(0.5), model=LoadOptions(os.environ["MODEL"]),
               columns=Columns(image="path", caption="text", id="id"))
"""


def test_table_paths_read_only_regular_files(
    engine: blipitm.Engine, tiny_ckpt: Path, tmp_path: Path
) -> None:
    (tmp_path / "ok.jpg").write_bytes(jpeg(0))
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    rows = [
        {"id": "ok", "path": "ok.jpg", "text": "a dog"},
        {"id": "fifo", "path": "fifo.jpg", "text": "a dog"},
        {"id": "zero", "path": "/dev/zero", "text": "a dog"},
        {"id": "link", "path": "zero.jpg", "text": "a dog"},
        {"id": "dir", "path": str(tmp_path), "text": "a dog"},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "run.py"
    script.write_text(PATHS_SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "t.jsonl"), str(out)],
        env={**os.environ, "MODEL": str(tiny_ckpt)},
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = pq.read_table(out / "scores" / "t.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in got] == [
        ("ok", "ok"),
        ("fifo", "bad_image"),
        ("zero", "bad_image"),
        ("link", "bad_image"),
        ("dir", "bad_image"),
    ]
    assert "row 1" in got[1]["error"] and "not a regular file" in got[1]["error"]
    assert "row 3" in got[3]["error"]


# -- two runs on one --out ------------------------------------------------------------------

HOLDER = """
import os, sys, time
from pathlib import Path
from blipitm.engine import LoadOptions
from blipitm.filtering import LocalRun, Threshold, filter_dataset

def progress(p):
    Path(sys.argv[3]).write_text("scoring")
    while not Path(sys.argv[4]).exists():
        time.sleep(0.05)

filter_dataset([sys.argv[1]], sys.argv[2], Threshold(0.5), model=LoadOptions(os.environ["MODEL"]),
               run=LocalRun(1), progress=progress)
"""


def test_a_second_run_on_one_out_is_refused_naming_the_holder(
    engine: blipitm.Engine, tiny_ckpt: Path, tmp_path: Path
) -> None:
    shard = write_tar(tmp_path / "a.tar", [sample(f"k{i}", i, "a dog") for i in range(3)])
    out = tmp_path / "out"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready, release = tmp_path / "ready", tmp_path / "release"
    child = subprocess.Popen(
        [sys.executable, str(script), str(shard), str(out), str(ready), str(release)],
        env={**os.environ, "MODEL": str(tiny_ckpt)},
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(FilterError) as e:
            filter_dataset([str(shard)], out, Threshold(0.5), model=engine)
        msg = str(e.value)
        assert f"pid {child.pid}" in msg and socket.gethostname() in msg and "since" in msg
        release.touch()
        assert child.wait(timeout=240) == 0
    finally:
        release.touch()
        if child.poll() is None:
            child.kill()
            child.wait()
    # The holder is gone: the lock is free, and the run resumes the finished output.
    stats = filter_dataset([str(shard)], out, Threshold(0.5), model=engine)
    assert stats.samples == 3 and stats.throughput.samples_scored_this_run == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over(
    engine: blipitm.Engine, tiny_ckpt: Path, tmp_path: Path
) -> None:
    shard = write_tar(tmp_path / "a.tar", [sample(f"k{i}", i, "a dog") for i in range(2)])
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(
        "import os, signal, sys\nfrom blipitm.engine import LoadOptions\n"
        "from blipitm.filtering import LocalRun, Threshold, filter_dataset\n"
        "filter_dataset([sys.argv[1]], sys.argv[2], Threshold(0.5),"
        " model=LoadOptions(os.environ['MODEL']), run=LocalRun(1),"
        " progress=lambda p: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), str(shard), str(out)],
        env={**os.environ, "MODEL": str(tiny_ckpt)},
        timeout=240,
    )
    assert done.returncode == -9
    stats = filter_dataset([str(shard)], out, Threshold(0.5), model=engine)
    assert stats.samples == 2


def test_interleaved_writers_of_one_shard_commit_only_their_own_file(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    write_tar(tmp_path / "a.tar", [sample(f"k{i}", i, "a dog") for i in range(4)])
    (shard,) = expand_inputs([str(tmp_path / "a.tar")])
    folder = tmp_path / "scores"
    folder.mkdir()
    one, two = (
        score_shard(engine, shard, folder, batch_size=1),
        score_shard(engine, shard, folder, batch_size=1),
    )
    next(one)
    next(two)
    for _ in one:
        pass
    for _ in two:
        pass
    table = pq.read_table(folder / "a.parquet")
    assert table["id"].to_pylist() == ["k0", "k1", "k2", "k3"]
    assert json.loads((folder / "a.done.json").read_text())["rows"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["a.done.json", "a.parquet"]


# -- truncated and oversized input ----------------------------------------------------------


def six(tmp_path: Path) -> Path:
    return write_tar(tmp_path / "six.tar", [sample(f"k{i}", i, "a dog") for i in range(6)])


def header_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["at_header", "inside_header", "gzip"])
def test_a_truncated_shard_is_a_shard_error(
    engine: blipitm.Engine, tmp_path: Path, cut: str, capsys: pytest.CaptureFixture[str]
) -> None:
    full = six(tmp_path)
    data = full.read_bytes()
    offsets = header_offsets(full)
    if cut == "at_header":
        bad, name = data[: offsets[9]], "bad.tar"
    elif cut == "inside_header":
        bad, name = data[: offsets[9] + 200], "bad.tar"
    else:
        packed = gzip.compress(data)
        bad, name = packed[: len(packed) * 3 // 4], "bad.tar.gz"
    (tmp_path / name).write_bytes(bad)
    out = tmp_path / "out"
    code = main(
        [
            *["filter", str(tmp_path / name), "--out", str(out)],
            *["--threshold", "0.5", "--model", str(engine.info.source)],
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"blipitm: error: shard {tmp_path / name}" in err
    assert not (out / "scores" / "bad.parquet").exists()


def test_tar_members_are_capped_and_duplicates_reported(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    big = b"a dog " * (2 << 20)  # 12 MiB: over the caption cap
    entries = [
        *members("a", ("jpg", jpeg(1)), ("txt", b"a dog")),
        *members("b", ("jpg", jpeg(2)), ("txt", big)),
        *members("c", ("jpg", jpeg(3)), ("txt", b"a cat"), ("png", jpeg(4)), ("txt", b"a car")),
        *members("d", ("jpg", jpeg(5)), ("txt", b"a dog")),
        *members("a", ("jpg", jpeg(6)), ("txt", b"a dog again")),
    ]
    raw_tar(tmp_path / "s.tar", entries)
    out = tmp_path / "out"
    stats = filter_dataset([str(tmp_path / "s.tar")], out, Threshold(0.0), model=engine)
    got = pq.read_table(out / "scores" / "s.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in got] == [
        ("a", "ok"),
        ("b", "bad_caption"),
        ("c", "bad_sample"),
        ("d", "ok"),
        ("a", "bad_sample"),
    ]
    assert "b.txt" in got[1]["error"] and "limit" in got[1]["error"]
    assert "c.txt" in got[2]["error"]
    assert stats.kept_samples == 2


def test_an_unbalanced_csv_quote_is_a_shard_error_naming_the_line(
    engine: blipitm.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    lines = ["id,path,text", 'c0,0.jpg,"a dog'] + [f"c{i},0.jpg,a cat" for i in range(1, 40)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(
        [
            *["filter", str(tmp_path / "t.csv"), "--out", str(out), "--image-col", "path"],
            *["--caption-col", "text", "--id-col", "id", "--threshold", "0.5"],
            *["--model", str(engine.info.source)],
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "t.csv" in err and "line 2" in err


# -- damaged outputs of an earlier run ------------------------------------------------------


def test_damaged_score_files_are_redone_and_temporaries_cleaned(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    a = write_tar(tmp_path / "a.tar", [sample(f"a{i}", i, "a dog") for i in range(3)])
    b = write_tar(tmp_path / "b.tar", [sample(f"b{i}", i, "a dog") for i in range(3)])
    c = write_tar(tmp_path / "c.tar", [sample(f"c{i}", i, "a dog") for i in range(3)])
    inputs = [str(a), str(b), str(c)]
    out = tmp_path / "out"
    filter_dataset(inputs, out, Threshold(0.5), model=engine)
    (out / "scores" / "a.parquet").unlink()
    data = (out / "scores" / "b.parquet").read_bytes()
    (out / "scores" / "b.parquet").write_bytes(data[: len(data) // 2])
    (out / "scores" / "c.done.json").write_text("{not json")
    litter = [
        out / "scores" / ".a.parquet.partial",
        out / "scores" / ".b.parquet.tmp-abc123",
        out / "kept" / ".a.tar.tmp-xyz",
        out / ".stats.json.tmp-1",
    ]
    for p in litter:
        p.write_bytes(b"left by a kill")
    stats = filter_dataset(inputs, out, Threshold(0.5), model=engine)
    assert stats.samples == 9 and stats.throughput.samples_scored_this_run == 9
    assert not any(p.exists() for p in litter)


def test_a_corrupt_manifest_is_one_line_saying_what_to_remove(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    a = write_tar(tmp_path / "a.tar", [sample("a0", 0, "a dog")])
    out = tmp_path / "out"
    filter_dataset([str(a)], out, Threshold(0.5), model=engine)
    (out / "manifest.json").write_text('{"version": 1, "inputs": [')
    with pytest.raises(FilterError, match=r"manifest\.json.*--restart"):
        filter_dataset([str(a)], out, Threshold(0.5), model=engine)
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FilterError, match=r"manifest\.json.*--restart"):
        filter_dataset([str(a)], out, Threshold(0.5), model=engine)


def test_resume_refuses_noisy_weights_and_another_dtype(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", preset="tiny", seed=0)
    a = write_tar(tmp_path / "a.tar", [sample("a0", 0, "a dog")])
    out = tmp_path / "out"
    filter_dataset([str(a)], out, Threshold(0.5), model=blipitm.load(str(ckpt)))
    with pytest.raises(FilterError, match="dtype"):
        filter_dataset(
            [str(a)], out, Threshold(0.5), model=blipitm.load(str(ckpt), dtype="bfloat16")
        )
    weights = load_file(ckpt / "model.safetensors")
    rng = np.random.default_rng(0)
    import torch

    noisy = {
        k: (v * (1 + 0.02 * torch.from_numpy(rng.standard_normal(v.shape)).to(v.dtype)))
        if v.is_floating_point()
        else v
        for k, v in weights.items()
    }
    save_file(noisy, ckpt / "model.safetensors")
    with pytest.raises(FilterError, match="weights"):
        filter_dataset([str(a)], out, Threshold(0.5), model=blipitm.load(str(ckpt)))


# -- kept samples keep the input's schema ---------------------------------------------------


def typed_table(seed: int) -> pa.Table:
    n = 3
    return pa.table(
        {
            "key": pa.array([f"s{seed}{i}" for i in range(n)], pa.large_string()),
            "jpg": pa.array([jpeg(seed * 10 + i) for i in range(n)], pa.binary()),
            "caption": pa.array(["a dog"] * n),
            "tags": pa.array(
                [[("a", 1)], [], [("b", 2), ("c", 3)]], pa.map_(pa.string(), pa.int64())
            ),
            "small": pa.array([1, 2, 3], pa.int8()),
            "when": pa.array([0, 1, 2], pa.timestamp("ms")),
            "day": pa.array([0, 1, 2], pa.date32()),
            "maybe": pa.array([None, None, None], pa.float64()),
            "cat": pa.array(["x", "y", "x"]).dictionary_encode(),
            "width": pa.array([1, 2, 3], pa.uint16()),
        }
    )


def test_kept_parquet_keeps_the_input_schema(engine: blipitm.Engine, tmp_path: Path) -> None:
    for k in range(2):
        pq.write_table(typed_table(k), tmp_path / f"{k}.parquet")
    out = tmp_path / "out"
    filter_dataset(
        [str(tmp_path / "0.parquet"), str(tmp_path / "1.parquet")],
        out,
        Threshold(0.0),
        model=engine,
    )
    want = pq.read_schema(tmp_path / "0.parquet")
    kept = [pq.read_schema(out / "kept" / f"{k}.parquet") for k in range(2)]
    assert kept[0].equals(kept[1])
    for f in want:
        assert kept[0].field(f.name).type == f.type, f.name
    table = ds.dataset(out / "kept", format="parquet").to_table()
    assert table.num_rows == 6
    assert table["tags"].to_pylist()[2] == [("b", 2), ("c", 3)]


def test_kept_jsonl_with_changing_types_keeps_the_lines(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    rows = [
        {"id": "j0", "path": "0.jpg", "text": "a dog", "extra": 1},
        {"id": "j1", "path": "0.jpg", "text": "a dog", "extra": "one"},
        {"id": "j2", "path": "0.jpg", "text": "a dog", "extra": {"n": [1]}},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    stats = filter_dataset(
        [str(tmp_path / "t.jsonl")],
        out,
        Threshold(0.0),
        model=engine,
        columns=Columns(image="path", caption="text", id="id"),
    )
    assert stats.kept_samples == 3
    kept = [json.loads(line) for line in (out / "kept" / "t.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in rows[0]} for r in kept] == rows
    assert all(isinstance(r["itm_probability"], float) for r in kept)


# -- captions, NULL scores, names and extensions --------------------------------------------


def test_captions_null_scores_tgz_and_image_extensions(
    engine: blipitm.Engine, tmp_path: Path
) -> None:
    def img(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), 120, np.uint8)).save(buf, fmt)
        return buf.getvalue()

    entries = [
        *members("a", ("jpg", jpeg(1)), ("txt", b"   ")),
        *members("b", ("jpg", jpeg(2)), ("txt", b"!!!")),
        *members("c", ("jpg", jpeg(3)), ("txt", b'["a dog", "a cat"]')),
        *members("d", ("bmp", img("BMP")), ("txt", b"a dog")),
        *members("e", ("gif", img("GIF")), ("txt", b"a dog")),
        *members("f", ("tiff", img("TIFF")), ("txt", b"a dog")),
        *members("g", ("jpeg", jpeg(4)), ("txt", b"a dog")),
    ]
    raw_tar(tmp_path / "plain.tar", entries)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    (tmp_path / "t.tgz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    out = tmp_path / "out"
    filter_dataset(
        [str(tmp_path / "s.tar.gz"), str(tmp_path / "t.tgz")], out, Threshold(0.5), model=engine
    )
    for name in ("s", "t"):
        table = pq.read_table(out / "scores" / f"{name}.parquet")
        got = [(r["id"], r["caption"], r["status"]) for r in table.to_pylist()]
        assert got == [
            ("a", "   ", "bad_caption"),
            ("b", "!!!", "bad_caption"),
            ("c", '["a dog", "a cat"]', "ok"),
            ("d", "a dog", "ok"),
            ("e", "a dog", "ok"),
            ("f", "a dog", "ok"),
            ("g", "a dog", "ok"),
        ]
        assert table["itm_probability"].null_count == 2  # NULL, not NaN
        assert (out / "kept" / f"{name}.tar").exists()


def test_a_ray_actor_commits_only_while_its_driver_holds_the_folder(
    engine: blipitm.Engine, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """ShardScorer (called here without Ray) checks the driver's lock token before a commit."""
    from blipitm.common.identity import model_record
    from blipitm.engine.options import LoadOptions
    from blipitm.filtering.lock import OutputLock
    from blipitm.filtering.ray_runner import ShardScorer
    from blipitm.filtering.readers import Columns

    write_tar(tmp_path / "a.tar", [sample("k0", 0, "a dog")])
    shards = expand_inputs([str(tmp_path / "a.tar")])
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    args = (LoadOptions(str(tiny_ckpt)), shards, str(out), Columns(), 4, model_record(engine))
    with OutputLock(out) as lock:
        events = list(ShardScorer(*args, token=lock.token)({"shard": np.array([0])}))
        assert bool(events[-1]["done"][0]) and (out / "scores" / "a.done.json").exists()
    (out / "scores" / "a.done.json").unlink()
    (out / "scores" / "a.parquet").unlink()
    # Another run took the folder over.
    with OutputLock(out), pytest.raises(FilterError, match="held by another run"):
        list(ShardScorer(*args, token="the-dead-driver")({"shard": np.array([0])}))
    assert sorted(p.name for p in (out / "scores").iterdir()) == []


# -- formats: TSV as one entry of the table, the CLI's choices from the tables ---------------


def test_tsv_is_read_unquoted_and_kept_as_parquet(engine: blipitm.Engine, tmp_path: Path) -> None:
    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    (tmp_path / "1.jpg").write_bytes(jpeg(1))
    (tmp_path / "t.tsv").write_text(
        "id\tpath\ttext\n"
        't0\t0.jpg\t"a dog" on grass\n'  # no quoting: the quotes are the caption's
        't1\t1.jpg\t["a cat", "two cats"]\n'
        "t2\t0.jpg\n"
    )
    out = tmp_path / "out"
    stats = filter_dataset(
        [str(tmp_path / "t.tsv")],
        out,
        Threshold(0.0),
        model=engine,
        columns=Columns(image="path", caption="text", id="id"),
    )
    got = pq.read_table(out / "scores" / "t.parquet").to_pylist()
    assert [(r["id"], r["candidate"], r["caption"], r["status"]) for r in got] == [
        ("t0", 0, '"a dog" on grass', "ok"),
        ("t1", 0, "a cat", "ok"),
        ("t1", 1, "two cats", "ok"),
        ("2", 0, None, "bad_row"),
    ]
    want = engine.score(jpeg(0), '"a dog" on grass').itm_probability[0]
    assert abs(got[0]["itm_probability"] - want) < 1e-6
    kept = pq.read_table(out / "kept" / "t.parquet")
    assert kept.schema.field("text").type == pa.string()
    assert kept["text"].to_pylist() == ['"a dog" on grass', '["a cat", "two cats"]']
    assert stats.kept_samples == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["kind"] for i in manifest["inputs"]] == ["tsv"]


def test_the_cli_takes_formats_and_choices_from_their_tables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from blipitm.filtering import FORMATS, By

    with pytest.raises(SystemExit):
        main(["filter", "--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert all(suffix in help for f in FORMATS for suffix in f.suffixes)
    assert "{" + ",".join(b.value for b in By) + "}" in help
