"""Tensor names: the expected Hugging Face state dict, and the original BLIP → HF key map as data.

Our model's parameter names are the Hugging Face ``BlipForImageTextRetrieval`` names
(docs/architecture.md, "The model"), so the only real differences are the vision tower's names in
the original Salesforce checkpoints (timm-style ViT) and the training-only tensors those checkpoints
carry. Text, projection and head keys are the same in both formats.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TypeVar

import torch

from blipitm.config import (
    BLIP_TEXT_HEAD_DIM,
    BLIP_VISION_LN_EPS,
    BlipConfig,
    TextConfig,
    VisionConfig,
)
from blipitm.errors import CheckpointError

T = TypeVar("T")

Shape = tuple[int, ...]

# Original BLIP (models/vit.py) name → Hugging Face name. ``{n}`` is a block index. An entry that
# ends in "." renames a prefix (the parameter name, e.g. "weight", follows unchanged); otherwise it
# renames one exact key. Everything not listed here keeps its name.
VISION_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    (
        "visual_encoder.blocks.{n}.attn.proj.",
        "vision_model.encoder.layers.{n}.self_attn.projection.",
    ),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
)

# Tensors a BLIP retrieval checkpoint carries that inference never uses (models/blip_retrieval.py):
# the momentum encoders and projections, the ITC queues and their pointer, the learned
# temperature, and the legacy ``position_ids`` buffer (an ``arange`` that older BERT code saved;
# transformers' own .bin files may carry it too).
DROPPED_KEY_PATTERNS: tuple[str, ...] = (
    r"^visual_encoder_m\.",
    r"^text_encoder_m\.",
    r"^vision_proj_m\.",
    r"^text_proj_m\.",
    r"^image_queue$",
    r"^text_queue$",
    r"^idx_queue$",
    r"^ptr_queue$",
    r"^temp$",
    r"(^|\.)position_ids$",
)

_DROPPED = re.compile("|".join(f"(?:{p})" for p in DROPPED_KEY_PATTERNS))


def _compile(template: str) -> re.Pattern[str]:
    # "a.{n}.b." → ^a\.(\d+)\.b\.(.*)$ (prefix); "a.b" → ^a\.b$ (exact).
    pattern = re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(f"^{pattern}(?P<rest>.*)$" if template.endswith(".") else f"^{pattern}$")


_TO_HF = tuple((_compile(src), dst) for src, dst in VISION_KEY_MAP)
_TO_ORIGINAL = tuple((_compile(dst), src) for src, dst in VISION_KEY_MAP)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, template in rules:
        m = pattern.match(key)
        if m is not None:
            groups = m.groupdict()
            return template.format(n=groups.get("n")) + (groups.get("rest") or "")
    return key


def is_dropped(key: str) -> bool:
    """Whether ``key`` is a training-only tensor that loading discards."""
    return _DROPPED.search(key) is not None


def _renamed(
    state_dict: Mapping[str, T], rules: tuple[tuple[re.Pattern[str], str], ...]
) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if new in out:
            # Both spellings of one tensor present: which one is meant cannot be decided.
            raise CheckpointError(f"checkpoint has two tensors that both map to {new!r}")
        out[new] = value
    return out


def hf_from_original(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Drop training-only tensors and rename original BLIP vision keys to Hugging Face names.

    Keys already in Hugging Face names pass through unchanged, so this is safe on either format.
    """
    return _renamed({k: v for k, v in state_dict.items() if not is_dropped(k)}, _TO_HF)


def original_from_hf(state_dict: Mapping[str, T]) -> dict[str, T]:
    """The inverse rename (Hugging Face → original BLIP names), for writing ``.pth`` files."""
    return _renamed(state_dict, _TO_ORIGINAL)


# -- expected tensors -------------------------------------------------------------------------


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _norm(prefix: str, width: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _vision_shapes(v: VisionConfig) -> dict[str, Shape]:
    d, p = v.hidden_size, "vision_model"
    shapes: dict[str, Shape] = {
        f"{p}.embeddings.class_embedding": (1, 1, d),
        f"{p}.embeddings.position_embedding": (1, v.num_patches + 1, d),
        f"{p}.embeddings.patch_embedding.weight": (d, 3, v.patch_size, v.patch_size),
        f"{p}.embeddings.patch_embedding.bias": (d,),
    }
    for i in range(v.num_hidden_layers):
        layer = f"{p}.encoder.layers.{i}"
        shapes |= _linear(f"{layer}.self_attn.qkv", 3 * d, d)  # fused q, k, v with bias
        shapes |= _linear(f"{layer}.self_attn.projection", d, d)
        shapes |= _norm(f"{layer}.layer_norm1", d)
        shapes |= _linear(f"{layer}.mlp.fc1", v.intermediate_size, d)
        shapes |= _linear(f"{layer}.mlp.fc2", d, v.intermediate_size)
        shapes |= _norm(f"{layer}.layer_norm2", d)
    shapes |= _norm(f"{p}.post_layernorm", d)
    return shapes


def _attention(prefix: str, width: int, kv_width: int) -> dict[str, Shape]:
    return (
        _linear(f"{prefix}.self.query", width, width)
        | _linear(f"{prefix}.self.key", width, kv_width)
        | _linear(f"{prefix}.self.value", width, kv_width)
        | _linear(f"{prefix}.output.dense", width, width)
        | _norm(f"{prefix}.output.LayerNorm", width)
    )


def _text_shapes(t: TextConfig, p: str = "text_encoder") -> dict[str, Shape]:
    d = t.hidden_size
    # No token-type embeddings and no pooler: BLIP's BertModel(add_pooling_layer=False).
    shapes: dict[str, Shape] = {
        f"{p}.embeddings.word_embeddings.weight": (t.vocab_size, d),
        f"{p}.embeddings.position_embeddings.weight": (t.max_position_embeddings, d),
    }
    shapes |= _norm(f"{p}.embeddings.LayerNorm", d)
    for i in range(t.num_hidden_layers):
        layer = f"{p}.encoder.layer.{i}"
        shapes |= _attention(f"{layer}.attention", d, d)
        # Cross-attention keys/values project from the vision width.
        shapes |= _attention(f"{layer}.crossattention", d, t.encoder_hidden_size)
        shapes |= _linear(f"{layer}.intermediate.dense", t.intermediate_size, d)
        shapes |= _linear(f"{layer}.output.dense", d, t.intermediate_size)
        shapes |= _norm(f"{layer}.output.LayerNorm", d)
    return shapes


def expected_shapes(config: BlipConfig) -> dict[str, Shape]:
    """Every tensor of ``BlipForImageTextRetrieval`` for ``config``: HF name → shape, in HF order.

    Equals ``transformers.BlipForImageTextRetrieval(cfg).state_dict()`` less the non-persistent
    ``position_ids`` buffer (tests/test_checkpoint.py checks it). Head counts do not change shapes.
    """
    return (
        _vision_shapes(config.vision)
        | _text_shapes(config.text)
        | _linear("vision_proj", config.image_text_hidden_size, config.vision.hidden_size)
        | _linear("text_proj", config.image_text_hidden_size, config.text.hidden_size)
        | _linear("itm_head", 2, config.text.hidden_size)
    )


# The captioner (``BlipForConditionalGeneration``; BLIP's ``BLIP_Decoder``): the same vision
# tower, a text decoder whose BERT keeps the encoder's layer names under ``text_decoder.bert``, and
# BERT's LM head under ``text_decoder.cls.predictions``.
CAPTION_TEXT_PREFIX = "text_decoder.bert"
LM_HEAD_PREFIX = "text_decoder.cls.predictions"
# Tensors that are another tensor under a second name: the LM head's output matrix is the word
# embedding matrix (``tie_word_embeddings``) and its bias is ``predictions.bias``. transformers 5
# writes only the right-hand names; BLIP's .pth files and transformers 4's .bin files carry both
# (equal). Loading keeps the right-hand name, and refuses a left-hand copy that differs from it.
TIED_KEYS: tuple[tuple[str, str], ...] = (
    (
        f"{LM_HEAD_PREFIX}.decoder.weight",
        f"{CAPTION_TEXT_PREFIX}.embeddings.word_embeddings.weight",
    ),
    (f"{LM_HEAD_PREFIX}.decoder.bias", f"{LM_HEAD_PREFIX}.bias"),
)


def untie(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tied copy (:data:`TIED_KEYS`) dropped, after checking that it
    equals the tensor it ties to (or renamed to that tensor's name, where only the copy exists)."""
    out = dict(state_dict)
    for copy, source in TIED_KEYS:
        if copy not in out:
            continue
        tensor = out.pop(copy)
        if source not in out:
            out[source] = tensor
        elif tuple(tensor.shape) != tuple(out[source].shape) or not torch.equal(
            tensor, out[source].to(tensor.dtype)
        ):
            raise CheckpointError(
                f"checkpoint has {copy!r} different from {source!r}; BLIP's LM head ties them "
                "(tie_word_embeddings), so one of the two is damaged or this is not a BLIP "
                "captioner checkpoint"
            )
    return out


def captioner_expected_shapes(config: BlipConfig) -> dict[str, Shape]:
    """Every tensor of ``BlipForConditionalGeneration`` for ``config`` (tied copies left out), as
    transformers 5 writes it: HF name -> shape."""
    t = config.text
    d = t.hidden_size
    return (
        _vision_shapes(config.vision)
        | _text_shapes(t, CAPTION_TEXT_PREFIX)
        | {f"{LM_HEAD_PREFIX}.bias": (t.vocab_size,)}
        | _linear(f"{LM_HEAD_PREFIX}.transform.dense", d, d)
        | _norm(f"{LM_HEAD_PREFIX}.transform.LayerNorm", d)
    )


def is_captioner_state_dict(keys: Collection[str]) -> bool:
    """Whether tensor names are a captioner's (a text decoder, no text encoder)."""
    return any(k.startswith("text_decoder.") for k in keys) and not any(
        k.startswith("text_encoder.") for k in keys
    )


# -- config inference -------------------------------------------------------------------------


def _heads(width: int, tower: str) -> int:
    # BLIP uses head_dim 64 in both towers: ViT-B 12 heads, ViT-L 16, BERT-base 12.
    if width % BLIP_TEXT_HEAD_DIM:
        raise CheckpointError(
            f"cannot infer the {tower} head count: width {width} is not a multiple of "
            f"{BLIP_TEXT_HEAD_DIM}; convert with a config.json instead"
        )
    return width // BLIP_TEXT_HEAD_DIM


def _max_index(keys: list[str], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def config_from_original(state_dict: Mapping[str, torch.Tensor]) -> BlipConfig:
    """Infer the architecture of a BLIP retrieval checkpoint from its tensor shapes.

    Accepts original or Hugging Face names, of an ITM model or a captioner (``text_decoder.*``).
    Works for base, large or any other size; head counts
    are width // 64 as BLIP trains them, LayerNorm eps are the original 1e-6 (vision) and 1e-12
    (text).
    """
    sd = hf_from_original(state_dict)
    keys = list(sd)

    def shape(name: str) -> Shape:
        if name not in sd:
            raise CheckpointError(
                f"cannot infer the model size: tensor {name!r} is missing; this does not look like "
                "a BLIP image-text retrieval checkpoint"
            )
        return tuple(sd[name].shape)

    v = "vision_model"
    width = shape(f"{v}.embeddings.class_embedding")[-1]
    patch = shape(f"{v}.embeddings.patch_embedding.weight")[-1]
    tokens = shape(f"{v}.embeddings.position_embedding")[1] - 1  # minus the class token
    side = round(tokens**0.5)
    if side * side != tokens:
        raise CheckpointError(
            f"cannot infer the image size: {tokens} patch positions do not form a square"
        )
    vision = VisionConfig(
        hidden_size=width,
        num_hidden_layers=_max_index(keys, f"{v}.encoder.layers."),
        num_attention_heads=_heads(width, "vision"),
        intermediate_size=shape(f"{v}.encoder.layers.0.mlp.fc1.weight")[0],
        image_size=side * patch,
        patch_size=patch,
        layer_norm_eps=BLIP_VISION_LN_EPS,
    )

    t = CAPTION_TEXT_PREFIX if is_captioner_state_dict(keys) else "text_encoder"
    vocab, text_width = shape(f"{t}.embeddings.word_embeddings.weight")
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=text_width,
        num_hidden_layers=_max_index(keys, f"{t}.encoder.layer."),
        num_attention_heads=_heads(text_width, "text"),
        intermediate_size=shape(f"{t}.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape(f"{t}.embeddings.position_embeddings.weight")[0],
        layer_norm_eps=1e-12,
        encoder_hidden_size=shape(f"{t}.encoder.layer.0.crossattention.self.key.weight")[1],
    )
    if t == CAPTION_TEXT_PREFIX:  # no ITC head: the default size, unused
        return BlipConfig(vision=vision, text=text)
    return BlipConfig(
        vision=vision, text=text, image_text_hidden_size=shape("vision_proj.weight")[0]
    )
