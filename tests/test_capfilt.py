"""blipitm filter --capfilt: BLIP's CapFilt bootstrap on tiny random checkpoints.

Every expectation is computed apart from the pipeline: the synthetic captions with the captioner
called one image at a time, the scores with ``Engine.score``, the cut and the counts from those.
One local Ray for the module (conftest's ``local_ray``); the captioner writes short
captions (``max_length`` 8) so that each run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import blipitm
from blipitm.cli.main import main
from blipitm.engine.options import LoadOptions
from blipitm.filtering import (
    CapFilt,
    FilterError,
    KeepFraction,
    LocalRun,
    RayRun,
    Threshold,
    filter_dataset,
)
from blipitm.filtering.capfilt import sample_seed
from blipitm.testing.make_checkpoint import make_checkpoint
from test_filtering import CAPTIONS, jpeg, sample, write_tar
from test_filtering_ray import assert_same_outputs

K = 2
MAX_LENGTH = 8  # the prompt's 4 tokens + 4
SCORES = ("itm_probability", "itm_logit", "itc_cosine", "blip_score")
BAD_KEY = "000010001"


@pytest.fixture(scope="module")
def cap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cap"), preset="tiny", seed=5, task="caption")


@pytest.fixture(scope="module")
def captioner(cap_dir: Path) -> Any:
    return blipitm.load_captioner(str(cap_dir))


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(str(tiny_ckpt))


def image_of(key: str) -> bytes:
    return jpeg(10 * int(key[:5]) + int(key[5:]))


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Two tar shards of three samples; sample 1 of shard 1 has a corrupt image."""
    paths = []
    for k in range(2):
        rows = [sample(f"{k:05d}{i:04d}", 10 * k + i, CAPTIONS[i]) for i in range(3)]
        if k == 1:
            rows[1]["jpg"] = b"\xff\xd8 not a jpeg"
        paths.append(str(write_tar(tmp_path / f"{k:05d}.tar", rows)))
    return paths


def capfilt(cap: Any, **kw: Any) -> CapFilt:
    return CapFilt(cap, **{"synthetic": K, "seed": 3, "max_length": MAX_LENGTH, **kw})


def rows_of(out: Path) -> list[dict[str, Any]]:
    files = sorted((out / "scores").glob("*.parquet"))
    return [{**r, "shard": p.stem} for p in files for r in pq.read_table(p).to_pylist()]


def test_capfilt_scores_originals_and_synthetics_and_keeps_the_matches(
    engine: blipitm.Engine, captioner: Any, shards: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Batches of 2: a shard's three samples come in two batches, unlike the captioner below.
    stats = filter_dataset(
        shards, out, Threshold(0.5), model=engine, run=LocalRun(2), capfilt=capfilt(captioner)
    )
    rows = rows_of(out)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(r["id"], []).append(r)
    assert sorted(by_key) == [f"{k:05d}{i:04d}" for k in range(2) for i in range(3)]
    for key, rs in by_key.items():
        if key == BAD_KEY:  # the captioner refused it: a status, its caption unscored
            assert [(r["source"], r["status"]) for r in rs] == [("original", "bad_image")]
            assert rs[0]["itm_probability"] is None and "image" in rs[0]["error"]
            continue
        drawn = captioner.caption(
            image_of(key),
            sample=True,
            seed=sample_seed(3, rs[0]["shard"], key),
            num_captions=K,
            max_length=MAX_LENGTH,
        )[0].captions
        assert [r["caption"] for r in rs] == [CAPTIONS[int(key[5:])], *drawn]
        assert [r["source"] for r in rs] == ["original"] + ["synthetic"] * K
        assert [r["candidate"] for r in rs] == list(range(1 + K))
        want = engine.score(image_of(key), [r["caption"] for r in rs])
        np.testing.assert_allclose(
            [r["itm_probability"] for r in rs], want.itm_probability, atol=1e-5
        )
        np.testing.assert_allclose([r["itc_cosine"] for r in rs], want.itc_cosine, atol=1e-5)
        assert [r["kept"] for r in rs] == [p >= 0.5 for p in want.itm_probability]

    # stats.json: the filter's counts over all captions, and per source.
    ok = [r for r in rows if r["status"] == "ok"]
    assert stats.pairs == len(rows) == 1 + 5 * (1 + K) and stats.scored_pairs == len(ok)
    assert stats.kept_pairs == sum(r["kept"] for r in rows) > 0
    for source in ("original", "synthetic"):
        mine = [r for r in rows if r["source"] == source]
        assert stats.sources is not None
        assert stats.sources[source] == {
            "pairs": len(mine),
            "scored": sum(r["status"] == "ok" for r in mine),
            "kept": sum(r["kept"] for r in mine),
        }
    assert json.loads((out / "stats.json").read_text())["sources"] == stats.sources

    # The kept shards: original members untouched, and every kept caption with its source.
    kept_keys = {r["id"] for r in rows if r["kept"]}
    seen = set()
    for path in sorted((out / "kept").glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
        for name, data in members.items():
            if not name.endswith(".scores.json"):
                continue
            key = name.split(".")[0]
            seen.add(key)
            assert members[f"{key}.jpg"] == image_of(key)
            got = json.loads(data)["captions"]
            want_kept = [r for r in by_key[key] if r["kept"]]
            assert [(c["caption"], c["source"]) for c in got] == [
                (r["caption"], r["source"]) for r in want_kept
            ]
            assert [c["itm_probability"] for c in got] == [r["itm_probability"] for r in want_kept]
    assert seen == kept_keys


def test_synthetic_captions_depend_on_seed_shard_and_key_only(
    engine: blipitm.Engine, captioner: Any, tmp_path: Path
) -> None:
    """One image under three keys: each key draws its own captions; batch size and a rerun
    under another folder change nothing; another seed changes them."""
    rows = [sample(f"0000{i}", 7, CAPTIONS[0]) for i in range(3)]
    inputs = [str(write_tar(tmp_path / "same.tar", rows))]
    synthetic = {}
    for name, batch, seed in (("a", 1, 3), ("b", 3, 3), ("c", 3, 4)):
        filter_dataset(
            inputs,
            tmp_path / name,
            Threshold(0.5),
            model=engine,
            run=LocalRun(batch),
            write="scores",
            capfilt=capfilt(captioner, seed=seed),
        )
        got = [r for r in rows_of(tmp_path / name) if r["source"] == "synthetic"]
        synthetic[name] = [(r["id"], r["caption"]) for r in got]
    assert synthetic["a"] == synthetic["b"]
    per_key = [[c for k, c in synthetic["a"] if k == f"0000{i}"] for i in range(3)]
    assert len({tuple(c) for c in per_key}) == 3  # the same image, three keys: three draws
    assert synthetic["c"] != synthetic["a"]


def test_cli_capfilt_parquet_keep_fraction(
    tiny_ckpt: Path, cap_dir: Path, engine: blipitm.Engine, tmp_path: Path
) -> None:
    """A table with caption lists: every original is a candidate; the kept Parquet's
    ``captions`` column holds the kept captions with their source and scores."""
    table = [
        {"key": f"t{i}", "jpg": jpeg(50 + i), "caption": [CAPTIONS[i], CAPTIONS[3]]}
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "t.parquet")
    out = tmp_path / "out"
    args = ["filter", str(tmp_path / "t.parquet"), "--out", str(out), "--keep-fraction", "0.5"]
    args += ["--model", str(tiny_ckpt), "--capfilt", "--captioner", str(cap_dir)]
    code = main([*args, "--synthetic", "3", "--caption-max-length", str(MAX_LENGTH)])
    assert code == 0
    rows = rows_of(out)
    assert len(rows) == 3 * (2 + 3)
    assert [r["source"] for r in rows[:5]] == ["original"] * 2 + ["synthetic"] * 3
    probs = np.array([r["itm_probability"] for r in rows], np.float32)
    assert sum(r["kept"] for r in rows) == 8  # ceil(0.5 * 15), the best by probability
    assert min(p for p, r in zip(probs, rows, strict=True) if r["kept"]) >= max(
        p for p, r in zip(probs, rows, strict=True) if not r["kept"]
    )
    kept = pq.read_table(out / "kept" / "t.parquet").to_pylist()
    assert [k["key"] for k in kept] == sorted({r["id"] for r in rows if r["kept"]})
    for k in kept:
        want = [r for r in rows if r["id"] == k["key"] and r["kept"]]
        assert [(c["caption"], c["source"]) for c in k["captions"]] == [
            (r["caption"], r["source"]) for r in want
        ]
        assert k["caption"] == table[int(k["key"][1:])]["caption"]  # the original column stays


@pytest.mark.parametrize(
    ("flags", "flag", "message"),
    [
        (["--capfilt", "--synthetic", "0"], "--synthetic", "must be >= 1"),
        (["--capfilt", "--synthetic", "-2"], "--synthetic", "must be >= 1"),
        (["--capfilt"], "--captioner", "--capfilt needs the captioner"),
        (["--synthetic", "2"], "--synthetic", "only means something with --capfilt"),
        (["--capfilt", "--top-p", "0"], "--top-p", "must be in (0, 1]"),
        (["--capfilt", "--captioner", "ITM"], "--captioner", "not a captioner"),
        (["--capfilt", "--captioner", "MISSING"], "--captioner", "missing"),
    ],
)
def test_cli_bad_capfilt_flags_are_named(
    flags: list[str],
    flag: str,
    message: str,
    tiny_ckpt: Path,
    cap_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_tar(tmp_path / "s.tar", [sample("a", 1, "a dog")])
    named = {"ITM": str(tiny_ckpt), "MISSING": str(tmp_path / "missing")}
    flags = [named.get(f, f) for f in flags]
    if "--capfilt" in flags and flag != "--captioner":
        flags += ["--captioner", str(cap_dir)]
    args = ["filter", str(tmp_path / "s.tar"), "--out", str(tmp_path / "o"), "--threshold", "0.5"]
    code = main([*args, "--model", str(tiny_ckpt), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"blipitm: error: {flag}: ") and message in err, err
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_python_capfilt_is_checked(tiny_ckpt: Path, shards: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synthetic: must be >= 1"):
        CapFilt(LoadOptions("x"), synthetic=0)
    with pytest.raises(ValueError, match="captioner: must be a Captioner or a LoadOptions"):
        CapFilt("Salesforce/blip-image-captioning-base")  # type: ignore[arg-type]
    itm = LoadOptions(str(tiny_ckpt))
    with pytest.raises(ValueError, match=r"captioner: .* not a captioner"):
        filter_dataset(shards, tmp_path / "o", Threshold(0.5), model=itm, capfilt=CapFilt(itm))


KILLER = """
import os, signal, sys
from blipitm.engine import LoadOptions
from blipitm.filtering import CapFilt, LocalRun, Threshold, filter_dataset

def progress(p):
    if p.shard == 1:  # mid-shard: after its first batch, shard 0 committed
        os.kill(os.getpid(), signal.SIGKILL)

filter_dataset(sys.argv[2:], sys.argv[1], Threshold(0.5), model=LoadOptions(os.environ["MODEL"]),
               run=LocalRun(2), progress=progress,
               capfilt=CapFilt(LoadOptions(os.environ["CAPTIONER"]), synthetic=2, seed=3,
                               max_length=8))
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(
    engine: blipitm.Engine,
    captioner: Any,
    tiny_ckpt: Path,
    cap_dir: Path,
    shards: list[str],
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "MODEL": str(tiny_ckpt), "CAPTIONER": str(cap_dir)}
    done = subprocess.run([sys.executable, str(script), str(out), *shards], env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "scores").glob("*.done.json")) == ["00000.done.json"]
    assert not (out / "scores" / "00001.parquet").exists()
    before = (out / "scores" / "00000.done.json").stat().st_mtime_ns

    # Another seed or a plain filter run is not this run: refused, nothing redone.
    with pytest.raises(FilterError, match="CapFilt settings differ: seed 3 \\(now 4\\)"):
        filter_dataset(
            shards, out, Threshold(0.5), model=engine, capfilt=capfilt(captioner, seed=4)
        )
    with pytest.raises(FilterError, match="it was a CapFilt run"):
        filter_dataset(shards, out, Threshold(0.5), model=engine)

    seen: list[str] = []
    filter_dataset(
        shards,
        out,
        Threshold(0.5),
        model=engine,
        run=LocalRun(2),
        progress=lambda p: seen.append(p.name),
        capfilt=capfilt(captioner),
    )
    assert set(seen) == {"00001"}  # the committed shard is not redone
    assert (out / "scores" / "00000.done.json").stat().st_mtime_ns == before
    fresh = tmp_path / "fresh"
    filter_dataset(
        shards, fresh, Threshold(0.5), model=engine, run=LocalRun(2), capfilt=capfilt(captioner)
    )
    a, b = rows_of(out), rows_of(fresh)
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in a] == [
        {k: v for k, v in r.items() if k not in SCORES} for r in b
    ]
    for name in SCORES:
        np.testing.assert_allclose(
            [np.nan if r[name] is None else r[name] for r in a],
            [np.nan if r[name] is None else r[name] for r in b],
            atol=1e-6,
        )


@pytest.mark.usefixtures("local_ray", "two_threads")
def test_ray_capfilt_equals_local(
    tiny_ckpt: Path, cap_dir: Path, shards: list[str], tmp_path: Path
) -> None:
    """Both models in one actor; the same score tables, kept shards and stats as a local run.
    Fresh models on both sides (an actor's are): a cached encoding from another batching could
    differ in the last bit."""
    model, cap = LoadOptions(str(tiny_ckpt)), LoadOptions(str(cap_dir))
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    want = filter_dataset(
        shards, local, KeepFraction(0.5), model=model, run=LocalRun(2), capfilt=capfilt(cap)
    )
    got = filter_dataset(
        shards,
        ray_out,
        KeepFraction(0.5),
        model=model,
        run=RayRun(cpus_per_worker=2, batch_size=2),
        capfilt=capfilt(cap),
    )
    assert_same_outputs(local, ray_out)
    assert got.sources == want.sources and want.sources is not None
    assert want.sources["synthetic"]["pairs"] == 5 * K
