"""Settings that apply to every layer of a model, whichever model holds them (matching or
captioner): the attention kernel, and the dtype text activations compute in."""

from __future__ import annotations

import torch
from torch import nn

from blipitm.model.attention import ATTN_IMPLS, AttnImpl
from blipitm.model.layers import Embedding
from blipitm.model.text import Attention
from blipitm.model.vision import VisionAttention


def set_attn_impl(model: nn.Module, impl: AttnImpl) -> None:
    """Select the attention kernel everywhere: ``"sdpa"`` (default) or ``"eager"``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    for module in model.modules():
        if isinstance(module, (VisionAttention, Attention)):
            module.impl = impl


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Dtype of text activations (vision follows its input); None: the weights' dtype."""
    for module in model.modules():
        if isinstance(module, Embedding):
            module.compute_dtype = dtype
