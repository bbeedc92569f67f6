"""``blipitm eval`` end to end on a synthetic dataset: equal to a brute-force computation of BLIP's
protocol through ``Engine.score_matrix``; k_test above the gallery; resume after an interruption
(in process, and after SIGKILL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import main
from blipitm.evaluation import compute_scores, itm_eval, load_annotations, score_matrices
from test_progress import terminal_stderr

N_IMAGES, PER_IMAGE = 12, 3
WORDS = [
    "dog",
    "cat",
    "car",
    "tree",
    "sky",
    "person",
    "red",
    "blue",
    "green",
    "running",
    "sitting",
    "the",
    "a",
    "on",
    "in",
    "grass",
]


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flickr")
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    ann = []
    for i in range(N_IMAGES):
        name = f"sub/{i}.png" if i % 4 == 0 else f"{i}.jpg"
        size = (40 + 3 * i, 56 - 2 * i, 3)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / "images" / name)
        # Raw captions with BLIP-cleaned punctuation and capitals: the engine cleans them.
        caps = [" ".join(rng.choice(WORDS, 5 + j)).capitalize() + "." for j in range(PER_IMAGE)]
        ann.append({"image": name, "caption": caps})
    (root / "ann.json").write_text(json.dumps(ann))
    return root / "ann.json", root / "images"


def brute_force(engine: blipitm.Engine, images: list[str], texts: list[str], k: int):
    """BLIP's protocol from the full ITM matrix: top-k by cosine per query, -100 elsewhere."""
    m = engine.score_matrix(images, texts)
    full = m.itm_logits[..., 1] + m.itc_cosine  # [I, T]
    i2t = np.full(full.shape, -100.0, dtype=np.float32)
    for i in range(full.shape[0]):
        keep = np.argsort(-m.itc_cosine[i], kind="stable")[:k]
        i2t[i, keep] = full[i, keep]
    t2i = np.full(full.T.shape, -100.0, dtype=np.float32)
    for t in range(full.shape[1]):
        keep = np.argsort(-m.itc_cosine[:, t], kind="stable")[:k]
        t2i[t, keep] = full[keep, t]
    return i2t, t2i, m.itc_cosine


def run_cli(ann: Path, images: Path, out: Path, model: Path, *extra: str) -> dict:
    args = ["eval", "--annotations", str(ann), "--image-root", str(images)]
    args += ["--model", str(model), "--output", str(out), "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("k", [4, 1000])  # 1000: larger than both galleries
def test_eval_equals_brute_force(
    engine: blipitm.Engine, tiny_ckpt: Path, dataset: tuple[Path, Path], tmp_path: Path, k: int
) -> None:
    ann, images = dataset
    data = load_annotations(ann, images)
    assert len(data.images) == N_IMAGES and len(data.texts) == N_IMAGES * PER_IMAGE
    want_i2t, want_t2i, cos = brute_force(engine, data.images, data.texts, k)
    got_i2t, got_t2i = score_matrices(engine, data.images, data.texts, k_test=k)
    np.testing.assert_array_equal(got_i2t == -100, want_i2t == -100)  # same kept pairs
    np.testing.assert_allclose(got_i2t, want_i2t, atol=1e-4)
    np.testing.assert_allclose(got_t2i, want_t2i, atol=1e-4)

    results = run_cli(ann, images, tmp_path / "out", tiny_ckpt, "--k-test", str(k))
    assert results["itm"] == itm_eval(want_i2t, want_t2i, data.txt2img, data.img2txt)
    assert results["itc"] == itm_eval(cos, cos.T, data.txt2img, data.img2txt)
    n_img, n_txt = N_IMAGES, N_IMAGES * PER_IMAGE
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    assert results["pairs"]["protocol"] == n_img * k_i2t + n_txt * k_t2i
    union = (want_i2t != -100) | (want_t2i.T != -100)
    assert results["pairs"]["scored"] == int(union.sum())
    assert results["config"]["k_i2t"] == k_i2t and results["model"]["protocol"] == "blip"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "![recall at K](recall_at_k.png)" in report
    assert (tmp_path / "out" / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Interrupt(Exception):
    pass


def test_resume_after_interruption(
    engine: blipitm.Engine, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    ann, images = dataset
    data = load_annotations(ann, images)
    kwargs = {"k_test": 5, "chunk_pairs": 30, "work_dir": tmp_path / "work"}
    reference = compute_scores(engine, data.images, data.texts, k_test=5, chunk_pairs=30)

    def stop_after_three_chunks(stage: str, done: int, total: int) -> None:
        if stage == "itm" and done >= 90:
            raise Interrupt

    with pytest.raises(Interrupt):
        compute_scores(engine, data.images, data.texts, progress=stop_after_three_chunks, **kwargs)
    seen: list[tuple[str, int]] = []
    resumed = compute_scores(
        engine, data.images, data.texts, progress=lambda s, d, t: seen.append((s, d)), **kwargs
    )
    assert resumed.resumed
    # images and texts were not encoded again: their stages start complete
    assert ("images", N_IMAGES) in seen and ("images", 0) not in seen
    assert 0 < resumed.pairs_this_run <= resumed.pairs_scored - 90
    np.testing.assert_array_equal(resumed.scores_i2t, reference.scores_i2t)
    np.testing.assert_array_equal(resumed.scores_t2i, reference.scores_t2i)
    # changed inputs (k_test) start over instead of mixing results
    other = compute_scores(engine, data.images, data.texts, **{**kwargs, "k_test": 6})
    assert not other.resumed and other.pairs_this_run == other.pairs_scored


KILLER = """
import os, signal, sys
from blipitm.evaluation import workdir
saved = []
original = workdir.WorkDir.save_chunk
def save_chunk(self, key, values):
    original(self, key, values)
    saved.append(key)
    if len(saved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
workdir.WorkDir.save_chunk = save_chunk
from blipitm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill(tiny_ckpt: Path, dataset: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = dataset
    out = tmp_path / "killed"
    args = ["eval", "--annotations", str(ann), "--image-root", str(images), "--model"]
    args += [str(tiny_ckpt), "--output", str(out), "--k-test", "5", "--chunk-pairs", "30"]
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    assert len(list((out / ".work" / "chunks").glob("*.npy"))) == 2
    assert not (out / "results.json").exists()
    resumed = run_cli(ann, images, out, tiny_ckpt, "--k-test", "5", "--chunk-pairs", "30")
    fresh = run_cli(ann, images, tmp_path / "fresh", tiny_ckpt, "--k-test", "5")
    assert resumed["itm"] == fresh["itm"] and resumed["itc"] == fresh["itc"]
    assert resumed["timings"]["resumed"] is True
    assert resumed["pairs"]["scored_this_run"] < resumed["pairs"]["scored"]


def test_coco_format(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    ann, images = dataset
    karpathy = load_annotations(ann, images)
    entries = json.loads(ann.read_text())
    coco = {
        "images": [{"id": 100 + i, "file_name": e["image"]} for i, e in enumerate(entries)],
        "annotations": [
            {"image_id": 100 + i, "id": 7 * i + j, "caption": c}
            for i, e in enumerate(entries)
            for j, c in enumerate(e["caption"])
        ],
    }
    # annotations interleaved across images (first captions first) still group per image,
    # in file order within each image
    coco["annotations"].sort(key=lambda a: (a["id"] % 7, a["image_id"]))
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    got = load_annotations(tmp_path / "coco.json", images, limit_images=5)
    assert got.format == "coco" and got.images == karpathy.images[:5]
    assert got.img2txt == karpathy.img2txt[:5] and got.txt2img == karpathy.txt2img[:15]
    assert got.texts == karpathy.texts[:15]


def test_missing_images_fail_before_any_work(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    ann, _ = dataset
    with pytest.raises(blipitm.InvalidInputError, match="12 of 12 images are missing"):
        load_annotations(ann, tmp_path)


def test_bfloat16_tokens_are_stored_exactly(
    tiny_ckpt: Path, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    ann, images = dataset
    data = load_annotations(ann, images, limit_images=6)
    bf16 = blipitm.load(tiny_ckpt, dtype="bfloat16")
    in_memory = compute_scores(bf16, data.images, data.texts, k_test=3)
    on_disk = compute_scores(bf16, data.images, data.texts, k_test=3, work_dir=tmp_path / "w")
    np.testing.assert_array_equal(on_disk.scores_i2t, in_memory.scores_i2t)
    want_i2t, _, _ = brute_force(bf16, data.images, data.texts, 3)
    np.testing.assert_array_equal(in_memory.scores_i2t == -100, want_i2t == -100)
    np.testing.assert_allclose(in_memory.scores_i2t, want_i2t, atol=2e-2)


def test_cli_console_output(
    tiny_ckpt: Path, dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal the bars count images, captions and pairs (not tqdm's "it"); the closing
    line names the written files however ``--output`` was spelled."""
    ann, images = dataset
    args = ["eval", "--annotations", str(ann), "--image-root", str(images), "--limit-images", "4"]
    args += ["--k-test", "2", "--model", str(tiny_ckpt), "--output", f"{tmp_path}/eval1/"]
    with terminal_stderr() as terminal:
        assert main(args) == 0
    bars = terminal.screen()
    for stage, unit in (("images", "image"), ("texts", "caption"), ("itm", "pair")):
        assert any(line.startswith(f"{stage}: 100%") and unit in line for line in bars), bars
    assert not any("it/s" in line or "s/it" in line for line in bars), bars
    written = capsys.readouterr().out.splitlines()[-1]
    assert written.endswith(f"wrote {tmp_path}/eval1/results.json and {tmp_path}/eval1/report.md")


# -- malformed annotation files (issue 18, items 14 and 21) ---------------------------------------

_COCO_IMAGE = {"id": 1, "file_name": "0.jpg"}
_BAD_ANNOTATIONS: dict[str, tuple[bytes, str]] = {
    # name: (file content, what the one-line error must say besides the file's name)
    "invalid UTF-8": (b'[{"image": "0.jpg", "caption": ["caf\xe9"]}]', "UTF-8"),
    "5000-digit integer": (
        b'[{"image": "0.jpg", "caption": ["x"], "n": ' + b"1" * 5000 + b"}]",
        "4300 digits",
    ),
    "caption nested 100,000 deep": (
        b'[{"image": "0.jpg", "caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]",
        "nested deeper",
    ),
    "images not a list": (json.dumps({"images": 5, "annotations": []}).encode(), "'images'"),
    "id a list": (
        json.dumps({"images": [{"id": [1], "file_name": "0.jpg"}], "annotations": []}).encode(),
        "images[0].id",
    ),
    "id an object": (
        json.dumps(
            {"images": [{"id": {"a": 1}, "file_name": "0.jpg"}], "annotations": []}
        ).encode(),
        "images[0].id",
    ),
    "id repeated": (
        json.dumps({"images": [_COCO_IMAGE, {**_COCO_IMAGE, "file_name": "1.jpg"}]}).encode()[:-1]
        + b', "annotations": []}',
        "images[1].id",
    ),
    "file_name not a string": (
        json.dumps({"images": [{"id": 1, "file_name": 5}], "annotations": []}).encode(),
        "images[0].file_name",
    ),
    "annotations not a list": (
        json.dumps({"images": [_COCO_IMAGE], "annotations": 5}).encode(),
        "'annotations'",
    ),
    "image_id a list": (
        json.dumps(
            {"images": [_COCO_IMAGE], "annotations": [{"image_id": [1], "caption": "x"}]}
        ).encode(),
        "annotations[0].image_id",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_ANNOTATIONS))
def test_malformed_annotations_fail_with_one_line_naming_file_and_field(
    case: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: UnicodeDecodeError, ValueError, RecursionError or TypeError tracebacks. Now one
    line and exit 2, before the model is loaded."""
    content, says = _BAD_ANNOTATIONS[case]
    ann = tmp_path / "ann.json"
    ann.write_bytes(content)
    (tmp_path / "images").mkdir()
    args = ["eval", "--annotations", str(ann), "--image-root", str(tmp_path / "images")]
    args += ["--model", str(tiny_ckpt), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"blipitm: error: annotations: {ann}"), err
    assert says in err, err
    assert not (tmp_path / "out").exists()


def test_coco_ids_may_be_strings(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": "a", "file_name": "0.jpg"}, {"id": 2, "file_name": "1.jpg"}],
        "annotations": [{"image_id": 2, "caption": "x"}, {"image_id": "a", "caption": "y"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    got = load_annotations(tmp_path / "coco.json", tmp_path, check_files=False)
    assert got.texts == ["y", "x"] and got.txt2img == [0, 1]


def test_annotations_that_are_not_a_regular_file_fail_at_once(tmp_path: Path) -> None:
    """A FIFO with no writer used to block ``read_bytes`` forever."""
    fifo = tmp_path / "ann.json"
    os.mkfifo(fifo)
    with pytest.raises(blipitm.InvalidInputError, match="not a regular file") as info:
        load_annotations(fifo, tmp_path)
    assert info.value.field == "annotations"
