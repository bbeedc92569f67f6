"""blipitm filter on Ray Data: equal to the local run, resumable, and RayScorer.

One local Ray (2 CPUs) for the module (conftest's ``local_ray``): Ray start-up and each actor's
model load take seconds, so the tests share them (three actor pools in all).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.engine.options import LoadOptions
from blipitm.filtering import (
    KeepFraction,
    LocalRun,
    RayRun,
    RayScorer,
    Threshold,
    filter_dataset,
)
from test_filtering import CAPTIONS, jpeg, sample, write_tar

try:
    import ray
except ImportError:  # pragma: no cover - CI installs the test extra
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("ray[data] is not installed (pip install -e '.[test]')", allow_module_level=True)

SCORES = ("itm_probability", "itm_logit", "itc_cosine", "blip_score")


@pytest.fixture
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    """Fresh per test, like a Ray actor's: a cache hit from an earlier run's other batching
    could differ from a fresh encoding in the last bit."""
    return blipitm.load(str(tiny_ckpt))


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    """Three tar shards (one with a corrupt image, one without a caption) and a Parquet table
    with CapFilt caption lists."""
    paths = []
    for k in range(3):
        rows = [sample(f"{k:05d}{i:04d}", 10 * k + i, CAPTIONS[i % 4]) for i in range(5)]
        if k == 1:
            rows[2]["jpg"] = b"\xff\xd8 not a jpeg"
            del rows[4]["txt"]
        paths.append(str(write_tar(tmp_path / f"{k:05d}.tar", rows)))
    table = [
        {"key": f"t{i}", "jpg": jpeg(100 + i % 3), "caption": [CAPTIONS[i % 4], CAPTIONS[-1]]}
        for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "table.parquet")
    return [*paths, str(tmp_path / "table.parquet")]


def assert_same_outputs(a: Path, b: Path) -> None:
    """Score tables equal exactly (every column, ``kept`` included), kept files byte for byte,
    stats.json equal but for the throughput."""
    names = sorted(p.name for p in (a / "scores").glob("*.parquet"))
    assert names == sorted(p.name for p in (b / "scores").glob("*.parquet")) and names
    for name in names:
        ta, tb = pq.read_table(a / "scores" / name), pq.read_table(b / "scores" / name)
        assert ta.schema == tb.schema
        assert nan_as_none(ta) == nan_as_none(tb), name
    kept = sorted(p.name for p in (a / "kept").iterdir())
    assert kept == sorted(p.name for p in (b / "kept").iterdir()) and kept
    for name in kept:
        assert (a / "kept" / name).read_bytes() == (b / "kept" / name).read_bytes(), name
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    sa.pop("throughput"), sb.pop("throughput")
    assert sa == sb


def nan_as_none(t: pa.Table) -> list[dict[str, Any]]:
    """Rows, exactly, with NaN (no score) as None so that equal tables compare equal."""
    return [
        {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
        for r in t.to_pylist()
    ]


class Interrupt(Exception):
    pass


def stop_after_first_shard(p: Any) -> None:
    if p.shards_this_run == 1:
        raise Interrupt


@pytest.mark.usefixtures("local_ray", "two_threads")
def test_ray_run_resumes_a_local_run_and_equals_it(
    engine: blipitm.Engine, tiny_ckpt: Path, inputs: list[str], tmp_path: Path
) -> None:
    local, out = tmp_path / "local", tmp_path / "ray"
    want = filter_dataset(inputs, local, Threshold(0.5), model=engine, run=LocalRun(2))
    assert want.status_samples == {"bad_image": 1, "no_caption": 1, "ok": 19}

    # An interrupted local run leaves shard 0 committed; the Ray run must not redo it.
    with pytest.raises(Interrupt):
        filter_dataset(
            inputs,
            out,
            Threshold(0.5),
            model=engine,
            run=LocalRun(2),
            progress=stop_after_first_shard,
        )
    marker = out / "scores" / "00000.done.json"
    assert sorted(p.name for p in (out / "scores").glob("*.done.json")) == [marker.name]
    before = marker.stat().st_mtime_ns

    seen: list[Any] = []
    got = filter_dataset(
        inputs,
        out,
        Threshold(0.5),
        model=LoadOptions(str(tiny_ckpt)),
        run=RayRun(cpus_per_worker=2, batch_size=2),  # joins the running Ray
        progress=seen.append,
    )
    assert {p.name for p in seen} == {"00001", "00002", "table"}  # shard 0 not redone
    assert [p.samples for p in seen] == sorted(p.samples for p in seen)  # per batch, growing
    assert seen[-1].samples == 5 + 5 + 6 == got.throughput.samples_scored_this_run
    assert seen[-1].samples_expected == 16  # once a shard is done, the ETA has a total
    assert marker.stat().st_mtime_ns == before
    assert_same_outputs(local, out)
    assert got.threshold == want.threshold == 0.5


@pytest.mark.usefixtures("local_ray", "two_threads")
def test_cli_ray_keep_fraction_equals_local(
    engine: blipitm.Engine,
    tiny_ckpt: Path,
    inputs: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local = tmp_path / "local"
    want = filter_dataset(inputs, local, KeepFraction(0.4, by="blip"), model=engine)
    args = ["filter", *inputs, "--keep-fraction", "0.4", "--by", "blip", "--model"]
    # The default --cpus-per-worker: the running Ray's 2 CPUs for its 1 worker.
    code = main([*args, str(tiny_ckpt), "--out", str(tmp_path / "ray"), "--ray"])
    assert code == 0, capsys.readouterr().err
    assert_same_outputs(local, tmp_path / "ray")
    scored = want.scored_pairs
    assert want.kept_pairs == int(np.ceil(0.4 * scored))


def image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 30, 3), np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.mark.usefixtures("local_ray")
def test_rayscorer_in_a_users_pipeline_equals_engine_score(
    engine: blipitm.Engine, tiny_ckpt: Path
) -> None:
    rows = [{"img": image_bytes(i % 4), "text": CAPTIONS[i % 3], "n": i} for i in range(10)]
    rows[5]["img"] = image_bytes(5)[:40]  # truncated
    ds = ray.data.from_items(rows).map_batches(
        RayScorer,
        fn_constructor_kwargs={
            "model": LoadOptions(str(tiny_ckpt)),
            "image_col": "img",
            "caption_col": "text",
            "keep": Threshold(0.5),
        },
        concurrency=1,
        batch_size=4,
    )
    got = sorted(ds.take_all(), key=lambda r: r["n"])
    assert [r["n"] for r in got] == list(range(10))
    assert [r["status"] for r in got] == ["ok"] * 5 + ["bad_image"] + ["ok"] * 4
    assert "image" in got[5]["error"] or "truncated" in got[5]["error"].lower()
    assert np.isnan(got[5]["itm_probability"]) and not got[5]["kept"]
    ok = [r for r in got if r["status"] == "ok"]
    want = engine.score([r["img"] for r in ok], [r["text"] for r in ok])
    for j, r in enumerate(ok):
        assert r["img"] == rows[r["n"]]["img"]  # the input columns pass through
        assert abs(r["itm_probability"] - want.itm_probability[j]) < 1e-6
        assert abs(r["itm_logit"] - want.itm_logits[j, 1]) < 1e-6
        assert abs(r["itc_cosine"] - want.itc_cosine[j]) < 1e-6
        assert abs(r["blip_score"] - (want.itm_logits[j, 1] + want.itc_cosine[j])) < 2e-6
        assert r["kept"] == (r["itm_probability"] >= 0.5)


def test_rayscorer_caption_lists_statuses_and_identical_images(
    engine: blipitm.Engine, tiny_ckpt: Path
) -> None:
    """Called as a plain function (as Ray Data does, with numpy columns), no Ray needed."""
    scorer = RayScorer(LoadOptions(str(tiny_ckpt), cache_bytes=0))
    encoded: list[int] = []
    real = scorer.engine.model.encode_image

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        encoded.append(int(pixels.shape[0]))
        return real(pixels)

    scorer.engine.model.encode_image = counting  # type: ignore[method-assign]
    scorer(
        {"image": np.array([image_bytes(1), image_bytes(2), image_bytes(1)]), "caption": ["a"] * 3}
    )
    assert sum(encoded) == 2  # image 1 twice in the batch: encoded once, with the cache off

    images = np.array([image_bytes(1), image_bytes(2), image_bytes(1), None, b"junk"], object)
    captions = np.empty(5, object)
    captions[:] = [np.array(["a dog", "a cat"]), np.array([""]), np.array(["a dog"]), "x", "y"]
    out = scorer({"image": images, "caption": captions})
    assert [list(s) for s in out["status"][:3]] == [["ok", "ok"], ["bad_caption"], ["ok"]]
    assert list(out["status"][3:]) == ["missing_image", "bad_image"]
    want = engine.score([image_bytes(1)] * 2, ["a dog", "a cat"])
    np.testing.assert_allclose(out["itc_cosine"][0], want.itc_cosine, atol=1e-6)
    np.testing.assert_allclose(out["itm_probability"][2], want.itm_probability[:1], atol=1e-6)
    with pytest.raises(blipitm.InvalidInputError, match="caption_col"):
        scorer({"image": images})
