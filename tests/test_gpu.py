"""Parity on an accelerator: the device's results against float32 on the CPU, same weights.

Marked ``gpu``: skipped without CUDA (CI), run by ``bench/gpu.sh``. ``BLIPITM_TEST_DEVICE``
(default ``cuda``) names the device and ``BLIPITM_TEST_PRESET`` (default ``tiny``; gpu.sh uses
``base``) the random checkpoint; ``bench/gpu.sh --dry-run`` runs these on the CPU.

Budgets: float32 logits within 1e-4 of the CPU (different kernels and summation orders; cuDNN's
TF32 convolutions are off for float32, see ``engine.devices``); float16 and bfloat16 within the
dtype tests' budget, |Δ itm_probability| <= 0.02 and |Δ itc_cosine| <= 0.01.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blipitm
from blipitm.testing.make_checkpoint import make_checkpoint

DEVICE = os.environ.get("BLIPITM_TEST_DEVICE", "cuda")
PRESET = os.environ.get("BLIPITM_TEST_PRESET", "tiny")
TEXTS = [
    "a dog runs on the grass",
    "two people walking near a red car on the street",
    "a small child holding a blue ball in the park next to a tree",
    "the city at night",
]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="no CUDA device (bench/gpu.sh runs these on a GPU machine)",
    ),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp(PRESET), preset=PRESET, seed=5, text_heads=12)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [
        Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h))
        for h, w in ((300, 400), (384, 384), (250, 520))
    ]


@pytest.fixture(scope="module")
def cpu_fp32(ckpt: Path, images: list[Image.Image]) -> blipitm.MatrixScores:
    return blipitm.load(ckpt).score_matrix(images, TEXTS)


def test_float32_on_device_matches_cpu(
    ckpt: Path, images: list[Image.Image], cpu_fp32: blipitm.MatrixScores
) -> None:
    got = blipitm.load(ckpt, device=DEVICE).score_matrix(images, TEXTS)
    np.testing.assert_allclose(got.itm_logits, cpu_fp32.itm_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.itc_cosine, cpu_fp32.itc_cosine, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_on_device_within_budget(
    ckpt: Path, images: list[Image.Image], cpu_fp32: blipitm.MatrixScores, dtype: str
) -> None:
    if dtype == "float16" and not DEVICE.startswith("cuda"):
        pytest.skip("float16 is refused on the CPU (tests/test_dtypes.py)")
    engine = blipitm.load(ckpt, device=DEVICE, dtype=dtype)
    assert engine.info.compute_dtype in (dtype, "float32")
    got = engine.score_matrix(images, TEXTS)
    assert np.abs(got.itm_probability - cpu_fp32.itm_probability).max() <= 0.02
    assert np.abs(got.itc_cosine - cpu_fp32.itc_cosine).max() <= 0.01


@pytest.fixture(scope="module")
def cap_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"{PRESET}-caption")
    return make_checkpoint(out, preset=PRESET, seed=6, task="caption")


def test_captioner_on_device_matches_cpu(cap_ckpt: Path, images: list[Image.Image]) -> None:
    """Greedy and beam-3 captions in float32 on the device are the CPU's, word for word and of
    the same lengths (the logits agree to ~1e-4, like the ITM's above); in bfloat16
    and float16 every image still gets its captions, each within max_length."""
    kw: dict[str, object] = {"max_length": 12}
    cpu = blipitm.load_captioner(cap_ckpt, protocol="transformers")
    dev = blipitm.load_captioner(cap_ckpt, protocol="transformers", device=DEVICE)
    for search in ({"num_beams": 1}, {"num_beams": 3, "num_captions": 2}):
        want, got = cpu.caption(images, **kw, **search), dev.caption(images, **kw, **search)
        assert [r.tokens for r in got] == [r.tokens for r in want], search
        assert [r.captions for r in got] == [r.captions for r in want], search
    for dtype in ("bfloat16", "float16"):
        if dtype == "float16" and not DEVICE.startswith("cuda"):
            continue
        low = blipitm.load_captioner(cap_ckpt, protocol="transformers", device=DEVICE, dtype=dtype)
        results = low.caption(images, **kw)
        assert len(results) == len(images)
        assert all(r.prompt_tokens + max(r.tokens) <= 12 for r in results)
