"""Linear / LayerNorm / Conv2d / Embedding that compute in their input's dtype.

Weights may be stored in a narrower dtype than the computation uses: on CPUs without native
bfloat16 (no AVX512-BF16 / AMX) a bf16 matmul is several times slower than fp32, so the engine
stores bf16 weights (half the memory) and computes in fp32, casting each weight as it is used.
When storage and compute dtypes agree the casts are no-ops and these are the ``torch.nn`` layers.
Parameter names are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), _as(self.bias, x.dtype))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, _as(self.weight, x.dtype), _as(self.bias, x.dtype), self.eps
        )


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), _as(self.bias, x.dtype))


class Embedding(nn.Embedding):
    """Looks up rows and returns them in ``compute_dtype`` (the embedding has no input dtype)."""

    compute_dtype: torch.dtype | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out if self.compute_dtype is None else out.to(self.compute_dtype)
