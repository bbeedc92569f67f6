"""Scaled dot-product attention: an eager reference path and PyTorch's fused SDPA path.

Both take ``q [B, heads, Tq, d]``, ``k, v [B, heads, Tk, d]`` and an optional additive mask
broadcastable to ``[B, heads, Tq, Tk]``; tests hold them equal. The eager path is the
formula as the references (BLIP ``med.py``, transformers) write it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blipitm.config import ATTN_IMPLS, AttnImpl

__all__ = ["ATTN_IMPLS", "AttnImpl", "attention", "merge_heads", "padding_mask", "split_heads"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    impl: AttnImpl = "sdpa",
) -> torch.Tensor:
    """Return ``softmax(q k^T / sqrt(d) + mask) v`` as ``[B, heads, Tq, d]``."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl != "eager":
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, h, Tq, Tk]
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` 1/0 keep mask -> additive ``[B, 1, 1, T]`` mask (0 keep, dtype min drop).

    BLIP uses ``-10000`` and transformers the dtype minimum; both underflow to an exact zero
    weight after softmax, so the choice does not change results. The minimum is safe in fp16.
    """
    keep = attention_mask[:, None, None, :].to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, neg)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads*d]`` -> ``[B, heads, T, d]``."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, d]`` -> ``[B, T, heads*d]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)
