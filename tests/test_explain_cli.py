"""``blipitm explain``: scores equal the Python API; one overlay PNG per caption (and a token grid
when asked); typed errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.cli.main import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_explain_json_overlays_and_token_grid(
    tiny_ckpt: Path, image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a dog on the grass", "a red car"]
    argv = ["explain", str(image_path), *texts, "--model", str(tiny_ckpt)]
    assert main([*argv, "--out", str(tmp_path), "--per-token", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = blipitm.load(tiny_ckpt).explain_batch(image_path, texts)
    assert [r["text"] for r in rows] == texts
    for row, e in zip(rows, want, strict=True):
        assert row["itm_probability"] == pytest.approx(e.itm_probability, abs=2e-6)
        assert row["itc_cosine"] == pytest.approx(e.itc_cosine, abs=1e-6)
        assert row["tokens"] == e.tokens and row["layer"] == e.layer == 0
        with Image.open(row["overlay"]) as im:
            assert im.size == (80, 64)  # drawn over the image itself, not the model's input
        with Image.open(row["token_grid"]) as im:
            assert im.mode == "RGB" and im.size[0] > im.size[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-a-dog-on-the-grass-tokens.png",
        "00-a-dog-on-the-grass.png",
        "01-a-red-car-tokens.png",
        "01-a-red-car.png",
    ]


def test_explain_table_and_errors(
    tiny_ckpt: Path, image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(tiny_ckpt), "--out", str(tmp_path)]
    assert main(["explain", str(image_path), "a dog", "--layer", "1", *model]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer 1;") and "a dog" in out and "00-a-dog.png" in out
    assert main(["explain", str(image_path), "a dog", "--layer", "7", *model]) == 2
    assert "layer from 0 to 1" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), "a dog", *model]) == 2
    assert "missing.png" in capsys.readouterr().err
