"""BLIP's captioner: the ViT, a causal text decoder over the image tokens, and BERT's LM head.

Names follow the Hugging Face checkpoint (``BlipForConditionalGeneration``), which kept BLIP's
``BLIP_Decoder`` / ``med.py`` ``BertLMHeadModel`` names: ``vision_model.*`` (the ITM model's
tower), ``text_decoder.bert.*`` (the ITM text encoder's modules and names, run causally) and
``text_decoder.cls.predictions.*`` (dense -> GELU -> LayerNorm -> the word-embedding matrix as
the output layer, plus a bias; the checkpoint ties the two matrices).

Decoding is incremental: :meth:`BlipCaptioner.decode` takes the new tokens of every row and a
:class:`DecoderCache` holding the self-attention keys/values of the tokens before them, so each
step costs one token per row. Cross-attention keys/values depend only on the image
(:meth:`BlipCaptioner.cross_kv`), so they are computed once per image and shared by every step
and every row (beam, sample) of that image; rows are laid out image-major, ``rows_per_image``
saying how many each image has, as in the ITM pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from blipitm.config import BlipConfig, TextConfig
from blipitm.model import switches
from blipitm.model.attention import AttnImpl, attention, merge_heads, split_heads
from blipitm.model.layers import LayerNorm, Linear
from blipitm.model.quant import quantize_int8
from blipitm.model.text import Attention, CrossKV, DenseKV, TextEncoder, TextLayer
from blipitm.model.vision import VisionTransformer
from blipitm.preemption import yield_point


@dataclass
class DecoderCache:
    """Self-attention keys and values of the tokens decoded so far, per layer.

    Each tensor is ``[B, heads, capacity, head_dim]``; positions ``[0, length)`` are filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> DecoderCache:
        """The cache of rows ``rows`` (a beam reordered, finished rows dropped), in that order."""
        return DecoderCache(
            [k.index_select(0, rows) for k in self.keys],
            [v.index_select(0, rows) for v in self.values],
            self.length,
        )


class LMHeadTransform(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictions(nn.Module):
    """``cls.predictions``: the transform, then the (tied) word-embedding matrix and a bias."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.transform = LMHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> logits ``[..., V]``."""
        h = self.transform(x)
        return F.linear(h, output_weight.to(h.dtype), self.bias.to(h.dtype))


class LMHead(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.predictions = LMPredictions(config)


class TextDecoder(nn.Module):
    """``text_decoder``: ``bert`` (the ITM text encoder's modules) and ``cls`` (the LM head)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.bert = TextEncoder(config)
        self.cls = LMHead(config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden, self.bert.embeddings.word_embeddings.weight)


class BlipCaptioner(nn.Module):
    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.text_decoder = TextDecoder(config.text)

    # -- settings, as BlipITM's -----------------------------------------------------------------

    def set_attn_impl(self, impl: AttnImpl) -> None:
        """Select the attention kernel everywhere: ``"sdpa"`` (default) or ``"eager"``."""
        switches.set_attn_impl(self, impl)

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Dtype of text activations (vision follows its input); None: the weights' dtype."""
        switches.set_compute_dtype(self, dtype)

    def quantize_int8(self) -> None:
        """Dynamic int8 linear layers in both towers; the LM head (tied to the embedding) stays
        in float32."""
        quantize_int8(self.vision_model)
        quantize_int8(self.text_decoder.bert)

    # -- the image side -------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> image tokens ``[B, N, Dv]``."""
        return self.vision_model(pixel_values)

    def image_embedding(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The captioner has no ITC head: an empty ``[B, 0]`` embedding (what the image pipeline
        caches beside the tokens)."""
        return image_embeds.new_zeros(image_embeds.shape[0], 0, dtype=torch.float32)

    def cross_kv(self, image_embeds: torch.Tensor) -> DenseKV:
        """Every decoder layer's cross-attention keys/values for ``[G, N, Dv]`` image tokens."""
        return self.text_decoder.bert.cross_kv(image_embeds)

    # -- the text side --------------------------------------------------------------------------

    def new_cache(
        self, rows: int, capacity: int, *, dtype: torch.dtype, device: torch.device
    ) -> DecoderCache:
        """An empty cache for ``rows`` sequences of up to ``capacity`` tokens."""
        t = self.config.text
        shape = (rows, t.num_attention_heads, capacity, t.head_dim)
        layers = t.num_hidden_layers
        return DecoderCache(
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    def decode(
        self,
        ids: torch.Tensor,
        cache: DecoderCache,
        cross_kv: CrossKV,
        rows_per_image: Sequence[int],
        *,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits of the next token: ``ids [B, T]`` (the tokens after the cached ones) ->
        ``[B, V]`` at the last position (``last_only``) or ``[B, T, V]`` at every one.

        Row ``b`` continues ``cache`` row ``b`` (which this extends by ``T``) and cross-attends to
        image ``g`` of ``cross_kv`` for rows ``[sum(rows_per_image[:g]), ...)``.
        """
        b, t = ids.shape
        past = cache.length
        if past + t > cache.capacity:
            raise ValueError(f"{past + t} tokens do not fit a cache of {cache.capacity}")
        bert = self.text_decoder.bert
        emb = bert.embeddings
        positions = torch.arange(past, past + t, device=ids.device)
        x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions))  # [B,T,D]
        mask = None if t == 1 else _causal_mask(t, past, x.dtype, x.device)  # [T, past+T]
        d = x.shape[-1]
        rows = [r * t for r in rows_per_image]  # token rows of each image, image-major
        for i, layer in enumerate(cast(list[TextLayer], list(bert.encoder.layer))):
            x = _cached_self_attention(layer.attention, x, cache, i, mask)
            flat = layer.crossattention.forward_cross(x.reshape(b * t, d), cross_kv[i], rows)
            x = layer.output(layer.intermediate(flat), flat).view(b, t, d)
            yield_point()  # a background batch lets online work run here (blipitm.preemption)
        cache.length = past + t
        if last_only:
            x = x[:, -1]
        return self.text_decoder.logits(x)


def _causal_mask(t: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[T, past+T]`` mask: query ``i`` (position ``past+i``) sees keys ``<= past+i``."""
    q = torch.arange(t, device=device)[:, None] + past
    k = torch.arange(past + t, device=device)[None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(k <= q, zero, neg)


def _cached_self_attention(
    block: Attention,
    x: torch.Tensor,
    cache: DecoderCache,
    layer: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Post-norm causal self-attention of ``x [B, T, D]`` over the cached tokens and itself;
    writes this step's keys/values into ``cache`` at ``[length, length+T)``."""
    heads = block.self.heads
    past, t = cache.length, x.shape[1]
    q = split_heads(block.self.query(x), heads)  # [B, h, T, d]
    cache.keys[layer][:, :, past : past + t] = split_heads(block.self.key(x), heads)
    cache.values[layer][:, :, past : past + t] = split_heads(block.self.value(x), heads)
    k = cache.keys[layer][:, :, : past + t]  # [B, h, past+T, d]
    v = cache.values[layer][:, :, : past + t]
    context = attention(q, k, v, mask, impl=block.impl)  # [B, h, T, d]
    return cast(torch.Tensor, block.output(merge_heads(context), x))
