"""Salesforce BLIP's own tensor names, written out by hand: the key-name truth of the `.pth` tests.

Transcribed from salesforce/BLIP: ``models/vit.py`` (``VisionTransformer``, ``Block``,
``Attention``, ``Mlp``; timm's ``PatchEmbed.proj``), ``models/med.py`` (``BertModel`` with
``add_pooling_layer=False``: ``BertEmbeddings``, ``BertLayer`` with ``crossattention``) and
``models/blip_retrieval.py`` (``BLIP_Retrieval``: heads, momentum copies, queues, ``temp``), each
paired with the ``transformers.BlipForImageTextRetrieval`` name of the same tensor.

This module shares nothing with ``blipitm.checkpoint.keys`` on purpose: a `.pth` fixture written
with the production key map agrees with that map whatever it says (swap ``norm1``/``norm2`` in
both directions and every round trip still passes), so the fixtures are written from this table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")

# (BLIP name, Hugging Face name), once per model.
VISION_STEM = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual_encoder.patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias"),
    ("visual_encoder.norm.weight", "vision_model.post_layernorm.weight"),
    ("visual_encoder.norm.bias", "vision_model.post_layernorm.bias"),
)

# One ViT block: "visual_encoder.blocks.{n}." + BLIP suffix ↔ "vision_model.encoder.layers.{n}." +
# Hugging Face suffix. Pre-norm: norm1 before attention, norm2 before the MLP.
BLIP_BLOCK = "visual_encoder.blocks.{n}."
HF_BLOCK = "vision_model.encoder.layers.{n}."
VISION_BLOCK = (
    ("norm1.weight", "layer_norm1.weight"),
    ("norm1.bias", "layer_norm1.bias"),
    ("attn.qkv.weight", "self_attn.qkv.weight"),
    ("attn.qkv.bias", "self_attn.qkv.bias"),
    ("attn.proj.weight", "self_attn.projection.weight"),
    ("attn.proj.bias", "self_attn.projection.bias"),
    ("norm2.weight", "layer_norm2.weight"),
    ("norm2.bias", "layer_norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
)

# The text encoder and the heads have the same names in both formats (no token-type embeddings,
# no pooler in BLIP's BertModel).
TEXT_STEM = (
    "text_encoder.embeddings.word_embeddings.weight",
    "text_encoder.embeddings.position_embeddings.weight",
    "text_encoder.embeddings.LayerNorm.weight",
    "text_encoder.embeddings.LayerNorm.bias",
)
TEXT_LAYER_PREFIX = "text_encoder.encoder.layer.{n}."
# One BertLayer: self-attention, cross-attention (keys/values from the vision width), FFN.
TEXT_LAYER = (
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "crossattention.self.query.weight",
    "crossattention.self.query.bias",
    "crossattention.self.key.weight",
    "crossattention.self.key.bias",
    "crossattention.self.value.weight",
    "crossattention.self.value.bias",
    "crossattention.output.dense.weight",
    "crossattention.output.dense.bias",
    "crossattention.output.LayerNorm.weight",
    "crossattention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)
HEADS = (
    "vision_proj.weight",
    "vision_proj.bias",
    "text_proj.weight",
    "text_proj.bias",
    "itm_head.weight",
    "itm_head.bias",
)

# Training-only tensors of BLIP_Retrieval that inference drops: momentum copies of these towers
# (same names with "_m"), the ITC queues and their pointer, the temperature, and the position_ids
# buffer that med.py's BertEmbeddings saves in both text encoders.
MOMENTUM_TOWERS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")


def _layers(keys: list[str], prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    assert found == set(range(len(found))), f"{prefix}: layer indices {sorted(found)}"
    return len(found)


def blip_to_hf(vision_layers: int, text_layers: int) -> dict[str, str]:
    """Every inference tensor of a BLIP retrieval model: BLIP name → Hugging Face name."""
    names = dict(VISION_STEM)
    for n in range(vision_layers):
        for blip, hf in VISION_BLOCK:
            names[BLIP_BLOCK.format(n=n) + blip] = HF_BLOCK.format(n=n) + hf
    text = list(TEXT_STEM)
    text += [TEXT_LAYER_PREFIX.format(n=n) + s for n in range(text_layers) for s in TEXT_LAYER]
    names |= {name: name for name in (*text, *HEADS)}
    return names


def to_blip_names(hf_state_dict: Mapping[str, T]) -> dict[str, T]:
    """``hf_state_dict`` renamed to BLIP's names; it must hold exactly the table's tensors."""
    keys = list(hf_state_dict)
    table = blip_to_hf(
        _layers(keys, "vision_model.encoder.layers."), _layers(keys, "text_encoder.encoder.layer.")
    )
    hf_names = set(table.values())
    assert hf_names == set(keys), (
        f"table lacks {sorted(set(keys) - hf_names)}; file lacks {sorted(hf_names - set(keys))}"
    )
    return {blip: hf_state_dict[hf] for blip, hf in table.items()}


def training_extras(
    blip_state_dict: Mapping[str, torch.Tensor], *, seed: int, queue_size: int
) -> dict[str, torch.Tensor]:
    """What ``BLIP_Retrieval.state_dict()`` holds beyond inference; values differ from the weights
    they shadow, so loading a momentum copy instead of the weight is a visible mismatch."""
    g = torch.Generator().manual_seed(seed)
    extras: dict[str, torch.Tensor] = {}
    for name, tensor in blip_state_dict.items():
        tower, rest = name.split(".", 1)
        if tower in MOMENTUM_TOWERS:
            extras[f"{tower}_m.{rest}"] = torch.randn(tensor.shape, generator=g) * 0.05
    dim = blip_state_dict["vision_proj.weight"].shape[0]
    for queue in ("image_queue", "text_queue"):  # [dim, queue_size], columns unit length
        extras[queue] = F.normalize(torch.randn(dim, queue_size, generator=g), dim=0)
    extras["idx_queue"] = torch.full((1, queue_size), -100, dtype=torch.long)
    extras["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    extras["temp"] = torch.tensor(0.07)
    positions = blip_state_dict["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    for encoder in ("text_encoder", "text_encoder_m"):
        extras[f"{encoder}.embeddings.position_ids"] = torch.arange(positions)[None]  # [1, P]
    return extras


def write_blip_pth(
    hf_state_dict: Mapping[str, torch.Tensor], path: Path, *, seed: int, queue_size: int = 57
) -> Path:
    """Write ``hf_state_dict``'s tensors as an original BLIP retrieval ``{"model": ...}`` file."""
    weights = to_blip_names(hf_state_dict)
    weights |= training_extras(weights, seed=seed, queue_size=queue_size)
    torch.save({"model": weights}, path)
    return path


# BLIP_Decoder (models/blip.py): the same ViT as ``visual_encoder``; ``text_decoder`` is med.py's
# BertLMHeadModel, whose names transformers kept (``bert.*``, ``cls.predictions.*``). Its
# state_dict also holds the output layer tied to the word embeddings, the bias it shares, and
# BertEmbeddings' position_ids buffer.
CAPTION_TIED = (
    (
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.bert.embeddings.word_embeddings.weight",
    ),
    ("text_decoder.cls.predictions.decoder.bias", "text_decoder.cls.predictions.bias"),
)


def write_blip_caption_pth(hf_state_dict: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write a ``BlipForConditionalGeneration`` state dict as BLIP's captioner ``.pth``
    (``{"model": BLIP_Decoder.state_dict()}``)."""
    keys = list(hf_state_dict)
    names = dict(VISION_STEM)
    for n in range(_layers(keys, "vision_model.encoder.layers.")):
        for blip, hf in VISION_BLOCK:
            names[BLIP_BLOCK.format(n=n) + blip] = HF_BLOCK.format(n=n) + hf
    names |= {k: k for k in keys if k.startswith("text_decoder.")}
    assert set(names.values()) == set(keys), sorted(set(keys) - set(names.values()))
    weights = {blip: hf_state_dict[hf] for blip, hf in names.items()}
    weights |= {copy: weights[source] for copy, source in CAPTION_TIED}
    positions = weights["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0]
    weights["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions)[None]
    torch.save({"model": weights}, path)
    return path
