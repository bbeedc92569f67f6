"""Shared fixtures: random checkpoints written in the exact hub layout, once per session."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from blip_names import write_blip_pth
from blipitm.testing.make_checkpoint import make_checkpoint
from blipitm.testing.vocab import write_tokenizer_files


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
def tiny_pth(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_ckpt``'s tensors as an original BLIP ``.pth`` (tokenizer files beside it).

    Named from the hand-written table in blip_names.py, never from the production key map, so a
    wrong map shows up as a mismatch with ``tiny_ckpt``.
    """
    out = tmp_path_factory.mktemp("tiny_pth")
    write_tokenizer_files(out)
    weights = load_file(tiny_ckpt / "model.safetensors")
    return write_blip_pth(weights, out / "model_retrieval.pth", seed=1)


@pytest.fixture(scope="session", autouse=True)
def serve_port_trap() -> Iterator[int]:
    """The port a ``blipitm serve`` started by a test without ``--port`` would bind: one this
    session holds, set as ``BLIPITM_PORT`` for every child process.

    Without it such a test binds 8000, and fails only while something else listens there, such
    as the server the README starts in another shell (issue 18 item 13). With it, it fails every
    time, here and in CI; ``test_server_connections`` checks that this holds.
    """
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        port = int(trap.getsockname()[1])
        before = os.environ.get("BLIPITM_PORT")
        os.environ["BLIPITM_PORT"] = str(port)
        try:
            yield port
        finally:
            if before is None:
                os.environ.pop("BLIPITM_PORT", None)
            else:
                os.environ["BLIPITM_PORT"] = before


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs for one test module, started and stopped here: start-up takes
    seconds, so a module's Ray tests share it (a command's ``--ray`` joins it)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        object_store_memory=100 << 20,
        logging_level=logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """``local_ray``'s actors get 2 CPUs, so Ray gives them 2 torch threads; a local run under
    this fixture uses as many, so that every matmul reduces in the same order and the scores
    are bit-identical."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
