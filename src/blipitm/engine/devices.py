"""Dtypes by name and in torch, and which dtype to compute in on a device.

Outside engine/ and model/ a dtype is its name (:data:`~blipitm.engine.types.Dtype`); these
mappings are where the name becomes a ``torch.dtype`` and back.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from blipitm.engine.types import BatchSizes, Dtype

TORCH_DTYPES: dict[Dtype, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> Dtype:
    return next(name for name, d in TORCH_DTYPES.items() if d == dtype)


def native_compute_dtype(device: torch.device, storage: torch.dtype) -> torch.dtype:
    """``storage`` where the hardware runs it natively, else float32.

    bfloat16 on a CPU without AVX512-BF16 / AMX (or ARM BF16) is emulated and runs several times
    slower than fp32 (BENCHMARKS.md has the measurements), so such CPUs keep bf16 weights (half
    the memory) and compute in fp32, which is also more accurate.
    """
    if storage == torch.float32 or device.type != "cpu":
        return storage
    if storage == torch.bfloat16 and cpu_has_native_bf16():
        return storage
    return torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: Apple silicon M2+ has BF16; be optimistic on arm64 macOS
        return platform.system() == "Darwin" and platform.machine() == "arm64"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_batch_sizes(device: torch.device, compute_dtype: torch.dtype) -> BatchSizes:
    """Rows per forward pass where the caller sets none.

    On a CPU, texts run 128 to a batch where the arithmetic is bfloat16 (larger GEMMs run nearer
    the peak of a CPU's bfloat16 units) and 32 in float32, where larger batches gained nothing or
    lost; image encoding is flat from 4 to 16 images a batch. BENCHMARKS.md has the measurements.
    GPU batches are sized to fill the device."""
    if device.type == "cuda":
        return BatchSizes(images=64, texts=256)
    return BatchSizes(images=8, texts=32 if compute_dtype == torch.float32 else 128)
