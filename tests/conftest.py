"""Shared fixtures: random checkpoints written in the exact hub layout, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from blipitm.testing.make_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random checkpoint, hub layout, hub-style 4 text heads (head_dim 32)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_saved_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as ``tiny_ckpt``, in the layout ``save_pretrained`` writes today."""
    return make_checkpoint(
        tmp_path_factory.mktemp("tiny_saved"), preset="tiny", seed=0, layout="saved"
    )


@pytest.fixture(scope="session")
def tiny_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as ``tiny_ckpt`` as an original BLIP ``.pth`` (tokenizer files beside it)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_pth"), preset="tiny", seed=0, fmt="pth")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return Path(__file__).parent / "data"
