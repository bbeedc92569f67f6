"""Pure ``nn.Module`` code for BLIP ITM and BLIP's captioner; imports only torch and
``blipitm.config``."""

from blipitm.model.attention import ATTN_IMPLS, AttnImpl
from blipitm.model.blip import BlipITM
from blipitm.model.captioner import BlipCaptioner, DecoderCache
from blipitm.model.quant import int8_supported
from blipitm.model.text import CrossKV, DenseKV

__all__ = [
    "ATTN_IMPLS",
    "AttnImpl",
    "BlipCaptioner",
    "BlipITM",
    "CrossKV",
    "DecoderCache",
    "DenseKV",
    "int8_supported",
]
