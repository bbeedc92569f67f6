"""The BLIP image-text matching model: both towers, the ITC projections and the ITM head.

The methods are the model's real units of work, so that callers (the engine) can cache between
them: encode an image once, derive its ITC embedding and its cross-attention keys/values from the
same tokens, and score any number of texts against those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blipitm.config import BlipConfig
from blipitm.model import switches
from blipitm.model.attention import AttnImpl
from blipitm.model.layers import Linear
from blipitm.model.quant import quantize_int8
from blipitm.model.text import CrossKV, DenseKV, TextEncoder
from blipitm.model.vision import VisionTransformer


class BlipITM(nn.Module):
    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(config.text)
        self.vision_proj = Linear(config.vision.hidden_size, config.image_text_hidden_size)
        self.text_proj = Linear(config.text.hidden_size, config.image_text_hidden_size)
        self.itm_head = Linear(config.text.hidden_size, 2)

    def set_attn_impl(self, impl: AttnImpl) -> None:
        """Select the attention kernel everywhere: ``"sdpa"`` (default) or ``"eager"``."""
        switches.set_attn_impl(self, impl)

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Dtype of text activations (vision follows its input); None: the weights' dtype."""
        switches.set_compute_dtype(self, dtype)

    def quantize_int8(self) -> None:
        """Run the towers' linear layers in dynamic int8 (see :mod:`blipitm.model.quant`); the
        heads and projections (0.01% of the work) stay in float32, as do norms and attention."""
        quantize_int8(self.vision_model)
        quantize_int8(self.text_encoder)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> image tokens ``[B, N, Dv]``."""
        return self.vision_model(pixel_values)

    def image_embedding(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit-norm ITC embedding ``[B, E]`` from the image CLS token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm ITC embedding ``[B, E]`` from the unimodal pass's first token."""
        first = self.text_encoder.first_token(input_ids, attention_mask)
        return F.normalize(self.text_proj(first), dim=-1)

    def cross_kv(self, image_embeds: torch.Tensor) -> DenseKV:
        """Cross-attention keys/values of every text layer for ``[G, N, Dv]`` image tokens."""
        return self.text_encoder.cross_kv(image_embeds)

    def itm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cross_kv: CrossKV
    ) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (class 1 = match) for ``B = G*M`` texts over ``G`` images.

        Texts ``[g*M, (g+1)*M)`` are scored against image ``g`` of ``cross_kv``.
        """
        return self.itm_head(self.text_encoder.first_token(input_ids, attention_mask, cross_kv))
