"""BLIP's text encoder: BERT with a cross-attention block over image tokens in every layer.

Names follow the Hugging Face checkpoint (``text_encoder.*``), which kept BLIP's ``med.py`` names.
Two modes: *unimodal* (no cross-attention; the ITC text embedding) and *multimodal* (the ITM pass).

Cross-attention keys/values depend only on the image, so they are computed once per image
(:meth:`TextEncoder.cross_kv`) and shared by every text scored against it. A batch of
``B = G * M`` texts is laid out as ``G`` images with ``M`` texts each, contiguous; the ``M`` texts
of one image attend to that image's keys as one ``M*T``-row query block, which is exact because the
image side has no padding mask: each query row's softmax is over the same keys either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from blipitm.config import TextConfig
from blipitm.model.attention import AttnImpl, attention, merge_heads, padding_mask, split_heads
from blipitm.model.layers import Embedding, LayerNorm, Linear

# Per layer: (keys, values), each [G, heads, N_image_tokens, head_dim], or a sequence of G
# tensors [1, heads, N, head_dim] (images cached separately; attended without concatenating).
KV = torch.Tensor | Sequence[torch.Tensor]
CrossKV = Sequence[tuple[KV, KV]]
DenseKV = list[tuple[torch.Tensor, torch.Tensor]]  # what cross_kv computes


def num_images(kv: KV) -> int:
    return kv.shape[0] if isinstance(kv, torch.Tensor) else len(kv)


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    """Query/key/value projections (``attention.self`` or ``crossattention.self``)."""

    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(kv_width, config.hidden_size)
        self.value = Linear(kv_width, config.hidden_size)

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = split_heads(self.key(states), self.heads)  # [G, h, N, d]
        v = split_heads(self.value(states), self.heads)
        return k, v


class AttentionOutput(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(context) + residual)


# Sees a cross-attention's probabilities ``[G, h, M*T, N]`` and returns what the layer uses in
# their place (explanations: the same values, detached, as a leaf that collects their gradient).
Probe = Callable[[torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Post-norm attention block: ``LayerNorm(x + dense(attn(x, kv)))``."""

    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(config, kv_width)
        self.output = AttentionOutput(config)
        self.impl: AttnImpl = "sdpa"
        self.probe: Probe | None = None  # set only while explaining (blipitm.engine.explain)

    def forward_self(
        self, x: torch.Tensor, mask: torch.Tensor, first_only: bool = False
    ) -> torch.Tensor:
        """``first_only``: keys/values from every token, but only the first token's output
        ``[B, 1, D]`` (all that the heads read, after the last layer)."""
        xq = x[:, :1] if first_only else x
        q = split_heads(self.self.query(xq), self.self.heads)  # [B, h, Tq, d]
        k, v = self.self.kv(x)
        out = attention(q, k, v, mask, impl=self.impl)
        return self.output(merge_heads(out), xq)

    def forward_cross(self, x: torch.Tensor, kv: tuple[KV, KV]) -> torch.Tensor:
        k, v = kv  # [G, h, N, d]
        g = num_images(k)
        b, t, _ = x.shape
        m = b // g
        q = split_heads(self.self.query(x), self.self.heads)  # [G*M, h, T, d]
        h, d = q.shape[1], q.shape[3]
        q = q.view(g, m, h, t, d).transpose(1, 2).reshape(g, h, m * t, d)  # [G, h, M*T, d]
        if self.probe is not None:  # explaining: the probabilities themselves, then `@ v`
            if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
                raise ValueError("a probed cross-attention takes stacked keys/values")
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)  # [G, h, M*T, N]
            out = torch.matmul(self.probe(scores.softmax(dim=-1)), v)
        elif isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
            out = attention(q, k, v, impl=self.impl)  # [G, h, M*T, d]
        else:  # one image at a time: copying cached K/V into one batch costs more than this
            out = torch.cat([attention(q[i : i + 1], k[i], v[i], impl=self.impl) for i in range(g)])
        out = out.view(g, h, m, t, d).transpose(1, 2).reshape(b, h, t, d)  # [G*M, h, T, d]
        return self.output(merge_heads(out), x)


class Intermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class TextLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.attention = Attention(config, config.hidden_size)
        self.crossattention = Attention(config, config.encoder_hidden_size)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cross_kv: tuple[KV, KV] | None,
        first_only: bool = False,
    ) -> torch.Tensor:
        x = self.attention.forward_self(x, mask, first_only)
        if cross_kv is not None:
            x = self.crossattention.forward_cross(x, cross_kv)
        return self.output(self.intermediate(x), x)


class TextLayers(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(config) for _ in range(config.num_hidden_layers))


class TextEncoder(nn.Module):
    """``input_ids [B, T]`` (+ image keys/values) -> hidden states ``[B, T, D]``.

    The heads read only the first token, so :meth:`first_token` computes the last layer for
    that token alone (its keys/values still come from every token): the same numbers for
    about 7% less work.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextLayers(config)

    def cross_kv(self, image_embeds: torch.Tensor) -> DenseKV:
        """Every layer's cross-attention keys/values for ``image_embeds [G, N, Dv]``."""
        layers = cast(list[TextLayer], list(self.encoder.layer))
        return [layer.crossattention.self.kv(image_embeds) for layer in layers]

    def first_token(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_kv: CrossKV | None = None,
    ) -> torch.Tensor:
        """The last layer's first-token state ``[B, D]``."""
        return self.forward(input_ids, attention_mask, cross_kv, first_only=True)[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_kv: CrossKV | None = None,
        *,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Unimodal when ``cross_kv`` is None; otherwise ``B`` must be a multiple of its ``G``.

        ``first_only``: the last layer returns ``[B, 1, D]``, the first token only.
        """
        x = self.embeddings(input_ids)
        mask = padding_mask(attention_mask, x.dtype)  # [B, 1, 1, T]
        if cross_kv is not None and input_ids.shape[0] % num_images(cross_kv[0][0]):
            raise ValueError(
                f"{input_ids.shape[0]} texts cannot be split evenly over "
                f"{num_images(cross_kv[0][0])} images"
            )
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, mask, None if cross_kv is None else cross_kv[i], first_only and i == last)
        return x
