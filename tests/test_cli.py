"""The ``blipitm`` command line: in-process through ``main(argv)``, and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import build_parser, main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"blipitm {blipitm.__version__}"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"score", "convert"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert len(capsys.readouterr().out) > 200


def test_score_json_matches_python_api(
    tiny_ckpt: Path, image_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a dog on the grass", "a red car"]
    assert main(["score", str(image_path), *texts, "--model", str(tiny_ckpt), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = blipitm.load(tiny_ckpt).score(image_path, texts)
    assert [r["text"] for r in rows] == texts
    np.testing.assert_allclose([r["itm_probability"] for r in rows], want.itm_probability, 1e-6)
    np.testing.assert_allclose([r["itc_cosine"] for r in rows], want.itc_cosine, atol=1e-6)
    np.testing.assert_allclose([r["itm_logits"] for r in rows], want.itm_logits, atol=1e-6)


def test_score_table(tiny_ckpt: Path, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["score", str(image_path), "a dog", "a cat", "--model", str(tiny_ckpt)]
    assert main([*argv, "--protocol", "transformers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["text", "ITM", "prob", "ITC", "cos"]
    assert [line.split()[0:2] for line in lines[1:]] == [["a", "dog"], ["a", "cat"]]


def test_errors_are_one_line_not_tracebacks(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", str(tmp_path / "missing.jpg"), "x", "--model", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blipitm: error: ") and "missing.jpg" in err and "Traceback" not in err
    assert main(["score", str(tmp_path), "x", "--model", str(tmp_path / "nope")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_convert_round_trip(tiny_pth: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_pth), str(out), "--tokenizer", str(tiny_pth.parent)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), np.uint8))
    texts = ["a dog", "two people walking on the beach"]
    a = blipitm.load(out).score_matrix([image], texts)
    b = blipitm.load(tiny_pth).score_matrix([image], texts)
    c = blipitm.load(tiny_ckpt).score_matrix([image], texts)
    np.testing.assert_array_equal(a.itm_logits, b.itm_logits)
    np.testing.assert_array_equal(a.itm_logits, c.itm_logits)  # .pth == HF dir, same weights
    np.testing.assert_array_equal(a.itc_cosine, c.itc_cosine)
    assert main(["convert", str(tiny_pth), str(out)]) == 2  # refuses to overwrite


def test_console_script_runs(tiny_ckpt: Path, image_path: Path) -> None:
    command = [sys.executable, "-m", "blipitm.cli.main", "score", str(image_path), "a dog"]
    proc = subprocess.run(
        [*command, "--model", str(tiny_ckpt), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert 0.0 < json.loads(proc.stdout)["itm_probability"] < 1.0
