"""BLIP's vision tower: a pre-norm ViT with fused qkv, exact GELU and a final LayerNorm.

Module and parameter names are those of the Hugging Face checkpoint (``vision_model.*``); the
original BLIP names (``visual_encoder.*``) are mapped in ``checkpoint/``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blipitm.config import VisionConfig
from blipitm.model.attention import AttnImpl, attention, merge_heads
from blipitm.model.layers import Conv2d, LayerNorm, Linear
from blipitm.preemption import yield_point


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = Conv2d(3, d, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The stride-P PxP convolution as the matmul it is: exact float32 on CUDA too, where
        # cuDNN would otherwise run float32 convolutions in TF32 (torch's default).
        b, c, s, _ = pixel_values.shape
        p, n = self.patch_embedding.kernel_size[0], s // self.patch_embedding.kernel_size[0]
        patches = pixel_values.reshape(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5)  # [B,h,w,C,P,P]
        conv = self.patch_embedding
        weight = conv.weight.flatten(1).to(pixel_values.dtype)  # [D, C*P*P]
        bias = None if conv.bias is None else conv.bias.to(pixel_values.dtype)
        x = F.linear(patches.reshape(b, n * n, c * p * p), weight, bias)  # [B, N, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)  # [B, N+1, D]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size)
        self.projection = Linear(config.hidden_size, config.hidden_size)
        self.impl: AttnImpl = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, h, T, d]
        out = attention(qkv[0], qkv[1], qkv[2], impl=self.impl)
        return self.projection(merge_heads(out))


class VisionMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            yield_point()  # a background batch lets online work run here (blipitm.preemption)
        return x


class VisionTransformer(nn.Module):
    """``pixel_values [B, 3, S, S]`` -> image tokens ``[B, 1 + (S/P)^2, D]`` (CLS first)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
