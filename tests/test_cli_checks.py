"""Issue 18 items 10-12: the CLI checks what is cheap before it loads a model (seconds to
minutes), says when it loads one, takes ``$BLIPITM_MODEL`` as every command's default, accepts
``-v`` after the subcommand, and words its counts in the singular where there is one."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipitm.engine
from blipitm.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any model load fails the test (and records that it was tried)."""
    calls: list[Any] = []

    def refuse(options: Any) -> Any:
        calls.append(options)
        pytest.fail(f"the model was loaded ({options.source}) before the input was checked")

    monkeypatch.setattr(blipitm.engine, "load_options", refuse)
    return calls


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def build(tmp_path: Path, tiny_ckpt: Path, src: Path, name: str = "idx") -> Path:
    out = tmp_path / name
    assert main(["index", "build", str(src), "--out", str(out), "--no-progress",
                 "--model", str(tiny_ckpt)]) == 0  # fmt: skip
    return out


@pytest.fixture
def image_index(tmp_path: Path, tiny_ckpt: Path) -> Path:
    write_image(tmp_path / "pics" / "a.png")
    return build(tmp_path, tiny_ckpt, tmp_path / "pics", "images.index")


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("blipitm: error: ") and err.count("\n") == 1, err
    return err


# -- item 10: inputs before the model ---------------------------------------------------------


CASES = {
    "score-missing": (["score", "{tmp}/missing.jpg", "a dog"], "missing.jpg"),
    "score-text-file": (["score", "{tmp}/notes.txt", "a dog"], "is not an image file"),
    "score-folder": (["score", "{tmp}", "a dog"], "is not a regular file"),
    "explain-text-file": (["explain", "{tmp}/notes.txt", "a dog"], "is not an image file"),
    "search-missing-index": (["search", "{tmp}/none.index", "a dog"], "does not exist"),
    "search-missing-image": (["search", "{index}", "--image", "{tmp}/no.png"], "no.png"),
    "search-wrong-modality": (["search", "{index}", "--image", "{img}"], "holds no captions"),
    "search-top-k": (["search", "{index}", "a dog", "--top-k", "0"], "top_k"),
    "build-missing-source": (["index", "build", "{tmp}/nope", "--out", "{tmp}/o"], "nope"),
    "build-batch-size": (
        ["index", "build", "{tmp}", "--out", "{tmp}/o", "--batch-size", "0"],
        "batch_size",
    ),
    "add-missing-index": (["index", "add", "{tmp}/none.index", "{tmp}"], "does not exist"),
    "add-missing-source": (["index", "add", "{index}", "{tmp}/nope.txt"], "nope.txt"),
    "eval-annotations": (
        ["eval", "--annotations", "{tmp}/ann.json", "--image-root", "{tmp}"],
        "ann.json",
    ),
    "eval-image-root": (
        ["eval", "--annotations", "{tmp}/notes.txt", "--image-root", "{tmp}/no-images"],
        "no-images",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_errors_come_before_the_model(
    case: str,
    tmp_path: Path,
    image_index: Path,
    no_model: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n")
    argv, expected = CASES[case]
    names = {"tmp": str(tmp_path), "index": str(image_index), "img": str(tmp_path / "pics/a.png")}
    argv = [a.format(**names) for a in argv]
    # A model that does not exist: were it loaded first, its error would be the one shown.
    err = error_of([*argv, "--model", str(tmp_path / "no-such-model")], capsys)
    assert expected in err and "no-such-model" not in err
    assert no_model == []


def test_loading_is_announced_on_a_terminal_only(
    tiny_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = write_image(tmp_path / "a.png")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["score", str(image), "a dog", "--model", str(tiny_ckpt), "--json"]) == 0
    assert terminal.getvalue() == f"loading model {tiny_ckpt} ...\n"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["score", str(image), "a dog", "--model", str(tiny_ckpt), "--json"]) == 0
    assert capsys.readouterr().err == ""  # a pipe or a log file gets no such line


# -- item 11: searching the wrong modality ------------------------------------------------------


def test_search_of_the_wrong_modality_is_an_error(
    tiny_ckpt: Path, tmp_path: Path, image_index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "pics" / "a.png"
    err = error_of(["search", str(image_index), "--image", str(image)], capsys)
    assert "holds no captions (it holds 1 image)" in err
    (tmp_path / "captions.txt").write_text("a dog\na cat\n")
    captions = build(tmp_path, tiny_ckpt, tmp_path / "captions.txt", "captions.index")
    err = error_of(["search", str(captions), "a dog"], capsys)
    assert "holds no images (it holds 2 captions)" in err
    # The right modality still answers.
    assert main(["search", str(captions), "--image", str(image), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


# -- item 12: $BLIPITM_MODEL, -v anywhere, plurals --------------------------------------------


def test_blipitm_model_is_every_commands_default(
    tiny_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub default cannot be fetched here
    monkeypatch.setenv("BLIPITM_MODEL", str(tiny_ckpt))
    image = write_image(tmp_path / "pics" / "a.png")
    assert main(["score", str(image), "a dog", "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["itm_probability"] < 1
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "pics"), "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(tiny_ckpt.resolve())
    # --model still wins over the variable.
    monkeypatch.setenv("BLIPITM_MODEL", str(tmp_path / "no-such-model"))
    assert main(["score", str(image), "a dog", "--model", str(tiny_ckpt), "--json"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "$BLIPITM_MODEL if set" in capsys.readouterr().out


def test_verbose_is_accepted_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blipitm.cli.main import _verbosity

    args = build_parser().parse_args(["-v", "index", "info", "x.index", "-v"])
    assert _verbosity(args) == 2
    args = build_parser().parse_args(["score", "a.jpg", "a dog", "-vv"])
    assert _verbosity(args) == 2
    err = error_of(["index", "info", str(tmp_path / "none.index"), "-v"], capsys)
    assert "does not exist" in err


def test_counts_of_one_are_singular(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "pics" / "a.png")
    capsys.readouterr()
    out = build(tmp_path, tiny_ckpt, tmp_path / "pics")
    assert "now 1 image, 0 texts" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    assert re.search(r"items: +1 image, 0 texts", capsys.readouterr().out)
    assert main(["index", "verify", str(out)]) == 0
    assert "(1 row in 1 batch match" in capsys.readouterr().out


def test_readme_shows_how_to_try_it_offline() -> None:
    """The set-up has a runnable block (the docs test runs it) that writes the random checkpoint
    and scores with it, and the eval example's --image-root is the folder that holds
    flickr30k-images/ (BLIP's flickr30k_test.json paths start with it)."""
    from test_docs_examples import extract_blocks

    readme = ROOT / "README.md"
    setup = readme.read_text().split("## HTTP server")[0]
    blocks = [b for b in extract_blocks(readme, setup) if b.language == "shell" and not b.not_run]
    offline = [b.code for b in blocks if "python -m blipitm.testing.make_checkpoint" in b.code]
    assert offline and "blipitm score" in offline[0]
    roots = re.findall(r"--annotations flickr30k_test\.json --image-root (\S+)", readme.read_text())
    assert roots and not any(r.rstrip("/").endswith("flickr30k-images") for r in roots)


def test_bench_writes_outside_the_tracked_file() -> None:
    import subprocess

    text = (ROOT / "bench" / "run.py").read_text()
    default = re.search(r"^DEFAULT_OUT = (.+)$", text, re.M)
    assert default and '"bench" / "out"' in default[1]
    assert 'default=ROOT / "BENCHMARKS.md"' not in text
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "bench/out/BENCHMARKS.md"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0


def test_index_checks_need_no_torch() -> None:
    """The checks search and index build/add make before loading a model (the index, its kinds
    of items, the sources) import no torch either: the error comes in a fraction of a second."""
    import subprocess
    import sys

    code = "import sys, blipitm.retrieval; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
