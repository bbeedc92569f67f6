"""BLIP's text encoder: BERT with a cross-attention block over image tokens in every layer.

Names follow the Hugging Face checkpoint (``text_encoder.*``), which kept BLIP's ``med.py`` names.
Two modes: *unimodal* (no cross-attention; the ITC text embedding) and *multimodal* (the ITM pass).

Texts run *packed*: the ``L`` real tokens of a right-padded ``[B, T]`` batch are the rows of one
``[L, D]`` tensor (:class:`Packing`), so the linear layers, norms and FFN (nine tenths of the work)
never compute padding, and a batch of mixed lengths costs what its tokens cost. Only
self-attention goes back to the padded ``[B, T]`` layout, where the padding mask applies.

Cross-attention keys/values depend only on the image, so they are computed once per image
(:meth:`TextEncoder.cross_kv`) and shared by every text scored against it. A batch of
``B = G * M`` texts is laid out as ``G`` images with ``M`` texts each, contiguous; the token rows of
one image's ``M`` texts attend to that image's keys as one query block, which is exact because the
image side has no padding mask: each query row's softmax is over the same keys either way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from blipitm.config import TextConfig
from blipitm.model.attention import AttnImpl, attention, merge_heads, padding_mask, split_heads
from blipitm.model.layers import Embedding, LayerNorm, Linear
from blipitm.preemption import yield_point

# Per layer: (keys, values), each [G, heads, N_image_tokens, head_dim], or a sequence of G
# tensors [1, heads, N, head_dim] (images cached separately; attended without concatenating).
KV = torch.Tensor | Sequence[torch.Tensor]
CrossKV = Sequence[tuple[KV, KV]]
DenseKV = list[tuple[torch.Tensor, torch.Tensor]]  # what cross_kv computes


def num_images(kv: KV) -> int:
    return kv.shape[0] if isinstance(kv, torch.Tensor) else len(kv)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right-padded ``[B, T]`` batch are among its ``L`` packed rows."""

    index: torch.Tensor  # [L] row-major positions b*T + t of the real tokens, text by text
    starts: torch.Tensor  # [B] packed row of each text's first token
    lengths: list[int]  # [B] tokens per text
    width: int  # T

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        keep = attention_mask.reshape(-1).to(torch.bool)
        lengths = attention_mask.sum(dim=1)  # [B]
        starts = torch.cumsum(lengths, 0) - lengths
        index = keep.nonzero().squeeze(1)
        return cls(index, starts, lengths.tolist(), attention_mask.shape[1])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[L, D]`` -> ``[B, T, D]``, zeros at the padding."""
        b, d = len(self.lengths), x.shape[-1]
        out = x.new_zeros(b * self.width, d).index_copy_(0, self.index, x)
        return out.view(b, self.width, d)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[L, D]``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def rows_per_image(self, images: int, first_only: bool) -> list[int]:
        """Rows of each image's ``M = B / images`` texts: their tokens, or one row per text."""
        m = len(self.lengths) // images
        if first_only:
            return [m] * images
        return [sum(self.lengths[g * m : (g + 1) * m]) for g in range(images)]


def _image_kv(k: KV, v: KV, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``i``'s keys and values, ``[1, h, N, d]`` each."""
    if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        return k[i : i + 1], v[i : i + 1]
    return k[i], v[i]


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``[B, T]`` ids -> ``[L, D]`` packed token states."""
        ids = input_ids.reshape(-1).index_select(0, packing.index)  # [L]
        positions = packing.index % packing.width  # [L]
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
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


# Sees a cross-attention's probabilities ``[1, h, R, N]`` (one image, ``R`` packed token rows) and
# returns what the layer uses in their place (explanations: the same values, detached, as a leaf
# that collects their gradient).
Probe = Callable[[torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Post-norm attention block: ``LayerNorm(x + dense(attn(x, kv)))`` on packed rows."""

    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(config, kv_width)
        self.output = AttentionOutput(config)
        self.impl: AttnImpl = "sdpa"
        self.probe: Probe | None = None  # set only while explaining (blipitm.engine.gradcam)

    def forward_self(
        self, x: torch.Tensor, packing: Packing, mask: torch.Tensor, first_only: bool = False
    ) -> torch.Tensor:
        """``[L, D]`` -> ``[L, D]``; ``first_only``: keys/values from every token, but only each
        text's first-token output ``[B, D]`` (all that the heads read, after the last layer)."""
        heads = self.self.heads
        k = split_heads(packing.pad(self.self.key(x)), heads)  # [B, h, T, d]
        v = split_heads(packing.pad(self.self.value(x)), heads)
        if first_only:
            xq = x.index_select(0, packing.starts)  # [B, D]
            q = split_heads(self.self.query(xq)[:, None], heads)  # [B, h, 1, d]
            context = merge_heads(attention(q, k, v, mask, impl=self.impl))[:, 0]  # [B, D]
        else:
            xq = x
            q = split_heads(packing.pad(self.self.query(x)), heads)  # [B, h, T, d]
            context = packing.unpad(merge_heads(attention(q, k, v, mask, impl=self.impl)))
        return self.output(context, xq)

    def forward_cross(
        self, x: torch.Tensor, kv: tuple[KV, KV], rows_per_image: Sequence[int]
    ) -> torch.Tensor:
        """``[R, D]`` rows, the first ``rows_per_image[0]`` of image 0 and so on -> ``[R, D]``."""
        k, v = kv  # [G, h, N, d], or G tensors [1, h, N, d]
        r = x.shape[0]
        h = self.self.heads
        q = self.self.query(x).view(r, h, -1).transpose(0, 1)  # [h, R, d]
        g, m = len(rows_per_image), rows_per_image[0]
        if self.probe is not None:  # explaining: the probabilities themselves, then `@ v`
            if g != 1:
                raise ValueError("a probed cross-attention takes the texts of one image")
            k0, v0 = _image_kv(k, v, 0)  # [1, h, N, d]
            scores = torch.matmul(q[None], k0.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            out = torch.matmul(self.probe(scores.softmax(dim=-1)), v0)[0]  # [h, R, d]
        elif isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and g > 1 and r == g * m:
            # Equal rows per image (one per text): one batched call over the images.
            qg = q.reshape(h, g, m, -1).transpose(0, 1)  # [G, h, M, d]
            out = attention(qg, k, v, impl=self.impl).transpose(0, 1).reshape(h, r, -1)
        else:  # image by image: copying cached K/V into one batch costs more than this
            bounds = list(itertools.accumulate(rows_per_image, initial=0))
            outs = [
                attention(q[None, :, lo:hi], *_image_kv(k, v, i), impl=self.impl)[0]
                for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
            ]  # [h, rows of image i, d] each
            out = outs[0] if g == 1 else torch.cat(outs, dim=1)  # [h, R, d]
        return self.output(out.transpose(0, 1).reshape(r, -1), x)


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
        packing: Packing,
        mask: torch.Tensor,
        cross_kv: tuple[KV, KV] | None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Packed rows ``[L, D]`` -> ``[L, D]`` (``[B, D]``, first tokens, with ``first_only``)."""
        x = self.attention.forward_self(x, packing, mask, first_only)
        if cross_kv is not None:
            rows = packing.rows_per_image(num_images(cross_kv[0]), first_only)
            x = self.crossattention.forward_cross(x, cross_kv, rows)
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

        ``attention_mask [B, T]`` is 1 for each text's tokens, which come first (right padding).
        Hidden states at padding positions are zero. ``first_only``: the last layer returns
        ``[B, 1, D]``, the first token only.
        """
        if cross_kv is not None and input_ids.shape[0] % num_images(cross_kv[0][0]):
            raise ValueError(
                f"{input_ids.shape[0]} texts cannot be split evenly over "
                f"{num_images(cross_kv[0][0])} images"
            )
        packing = Packing.of(attention_mask)
        x = self.embeddings(input_ids, packing)  # [L, D]
        mask = padding_mask(attention_mask, x.dtype)  # [B, 1, 1, T]
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            kv = None if cross_kv is None else cross_kv[i]
            x = layer(x, packing, mask, kv, first_only and i == last)
            yield_point()  # a background batch lets online work run here (blipitm.preemption)
        return x[:, None] if first_only else packing.pad(x)
