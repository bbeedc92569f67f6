"""Reduced precision against the fp32 reference: the accuracy budget of issue #3.

Budget on base-size weights: |Δ itm_probability| <= 0.02 and |Δ itc_cosine| <= 0.01. bfloat16 is
checked both ways it can run: bf16 weights with fp32 arithmetic (what a CPU without native bf16
gets) and bf16 arithmetic end to end (CPUs with AVX512-BF16/AMX, and GPUs).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blipitm
from blipitm.engine.devices import native_compute_dtype
from blipitm.testing.make_checkpoint import make_checkpoint

TEXTS = [
    "a dog runs on the grass",
    "two people walking near a red car on the street",
    "a small child holding a blue ball in the park next to a tree",
    "the city at night",
]


def images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((300, 400), (384, 384), (250, 520)):
        small = rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return out


def cpu_computes_bf16() -> bool:
    """The README's rule, read here without blipitm: native bf16 arithmetic means the CPU flags
    AVX512-BF16 or AMX-BF16 (x86), or BF16 (ARM's "Features" line)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except FileNotFoundError:
        pytest.skip("no /proc/cpuinfo: the CPU's bf16 support cannot be read independently here")
    flags = r"^(?:flags|Features)\s*:.*\b(?:avx512_bf16|amx_bf16|bf16)\b"
    return re.search(flags, cpuinfo, re.MULTILINE) is not None


def test_native_compute_dtype_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native_compute_dtype(cpu, torch.float32) == torch.float32
    assert native_compute_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert native_compute_dtype(cuda, torch.float16) == torch.float16
    want = torch.bfloat16 if cpu_computes_bf16() else torch.float32
    assert native_compute_dtype(cpu, torch.bfloat16) == want


def test_bf16_engine_computes_in_what_the_cpu_supports(tiny_ckpt: Path) -> None:
    engine = blipitm.load(tiny_ckpt, dtype="bfloat16")
    assert engine.info.compute_dtype == ("bfloat16" if cpu_computes_bf16() else "float32")


def test_bf16_weights_are_stored_in_bf16(tiny_ckpt: Path) -> None:
    engine = blipitm.load(tiny_ckpt, dtype="bfloat16", compute_dtype="float32")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.info.dtype == "bfloat16" and engine.info.compute_dtype == "float32"
    scores = engine.score(images(0)[:1], TEXTS[:1])
    assert scores.itm_logits.dtype == np.float32 and np.isfinite(scores.itm_logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_bf16_accuracy_budget_base(tmp_path_factory: pytest.TempPathFactory, compute: str) -> None:
    ckpt = Path(tmp_path_factory.getbasetemp()) / "base-dtype"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, preset="base", seed=3, text_heads=12)
    ims = images(1)
    want = blipitm.load(ckpt).score_matrix(ims, TEXTS)
    got = blipitm.load(ckpt, dtype="bfloat16", compute_dtype=compute).score_matrix(ims, TEXTS)
    d_prob = np.abs(got.itm_probability - want.itm_probability).max()
    d_cos = np.abs(got.itc_cosine - want.itc_cosine).max()
    assert d_prob <= 0.02, d_prob
    assert d_cos <= 0.01, d_cos
