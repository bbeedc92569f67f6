"""Written checkpoints are as readable as the umask allows: a model directory is shared with the
users who serve it, so ``model.safetensors`` must not be private when ``config.json`` is not."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blipitm.cli.main import main
from blipitm.testing.make_checkpoint import make_checkpoint


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


def test_make_checkpoint_respects_umask(tmp_path: Path, umask: int) -> None:
    out = make_checkpoint(tmp_path / "ckpt", preset="tiny", seed=0)
    got = modes(out)
    assert "model.safetensors" in got and "config.json" in got
    assert got == dict.fromkeys(got, 0o666 & ~umask)


def test_convert_respects_umask(tiny_pth: Path, tmp_path: Path, umask: int) -> None:
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_pth), str(out)]) == 0
    got = modes(out)
    assert "model.safetensors" in got and "config.json" in got
    assert got == dict.fromkeys(got, 0o666 & ~umask)
