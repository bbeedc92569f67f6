"""Checkpoints: resolve (hub / local directory / original .pth), key map as data, strict loading,
conversion to the Hugging Face layout."""

from __future__ import annotations

from blipitm.checkpoint.convert import convert_to_hf
from blipitm.checkpoint.io import read_state_dict, write_safetensors
from blipitm.checkpoint.keys import (
    DROPPED_KEY_PATTERNS,
    VISION_KEY_MAP,
    config_from_original,
    expected_shapes,
    hf_from_original,
    is_dropped,
    original_from_hf,
)
from blipitm.checkpoint.load import load_weights
from blipitm.checkpoint.resolve import DEFAULT_TOKENIZER, ResolvedCheckpoint, resolve
from blipitm.checkpoint.strict import check_shapes, check_state_dict, load_into

__all__ = [
    "DEFAULT_TOKENIZER",
    "DROPPED_KEY_PATTERNS",
    "VISION_KEY_MAP",
    "ResolvedCheckpoint",
    "check_shapes",
    "check_state_dict",
    "config_from_original",
    "convert_to_hf",
    "expected_shapes",
    "hf_from_original",
    "is_dropped",
    "load_into",
    "load_weights",
    "original_from_hf",
    "read_state_dict",
    "resolve",
    "write_safetensors",
]
