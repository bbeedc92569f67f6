"""Pure ``nn.Module`` code for BLIP ITM. Imports only torch and ``blipitm.config``."""

from blipitm.model.attention import ATTN_IMPLS, AttnImpl
from blipitm.model.blip import BlipITM
from blipitm.model.quant import int8_supported
from blipitm.model.text import CrossKV, DenseKV

__all__ = ["ATTN_IMPLS", "AttnImpl", "BlipITM", "CrossKV", "DenseKV", "int8_supported"]
