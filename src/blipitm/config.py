"""Model configuration: frozen dataclasses, read from and written to Hugging Face ``config.json``.

Field names follow the Hugging Face BLIP config so that a hub ``config.json`` maps onto them one to
one. The two scoring protocols (docs/architecture.md, "Two protocols") may override a hub value; see
:meth:`blipitm.scoring.ScoringProtocol.configure`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Token ids fixed by BLIP's tokenizer: bert-base-uncased plus [DEC] and [ENC] appended.
PAD_TOKEN_ID = 0
CLS_TOKEN_ID = 101
SEP_TOKEN_ID = 102
DEC_TOKEN_ID = 30522
ENC_TOKEN_ID = 30523
VOCAB_SIZE = 30524

# What a checkpoint's config.json says it is (``architectures``): the ITM model this package
# scores with, and BLIP's captioner (docs/captioner.md).
ITM_ARCHITECTURE = "BlipForImageTextRetrieval"
CAPTIONER_ARCHITECTURE = "BlipForConditionalGeneration"
Task = Literal["itm", "caption"]  # what a checkpoint holds: the matching model or the captioner
# BLIP's captioning prompt (models/blip.py ``BLIP_Decoder``, configs/caption_coco.yaml); its
# tokens start every caption ([CLS] replaced by [DEC], the final [SEP] dropped) and are cut from
# the decoded text.
CAPTION_PROMPT = "a picture of "

# BLIP (Salesforce) architecture values that the hub config does not carry or carries wrongly.
BLIP_TEXT_HEAD_DIM = 64  # med_config.json: 12 heads for width 768
BLIP_VISION_LN_EPS = 1e-6  # models/vit.py: partial(nn.LayerNorm, eps=1e-6)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS at its default), so that the
# default behaviour is what users of Pillow already expect; here it is a per-call argument instead
# of a process-wide global. Here, not in processing/, so that the torch-free load options share it.
DEFAULT_MAX_PIXELS = 89_478_485

# How attention is computed (model/attention.py): the eager reference formula or PyTorch's fused
# SDPA. Here, torch-free, so that the load options can type and check the choice.
AttnImpl = Literal["eager", "sdpa"]
ATTN_IMPLS: tuple[AttnImpl, ...] = ("eager", "sdpa")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    encoder_hidden_size: int = 768
    pad_token_id: int = PAD_TOKEN_ID
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_text_hidden_size: int = 256  # ITC embedding size

    # -- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BlipConfig:
        """Read a ``BlipConfig`` from a Hugging Face BLIP ``config.json`` dict.

        Unknown keys are ignored (the hub file carries many training-only ones); missing keys take
        the transformers defaults, as ``BlipConfig.from_pretrained`` would.
        """
        if d.get("model_type") not in (None, "blip"):
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}, expected 'blip'")
        vision = _pick(VisionConfig, d.get("vision_config") or {})
        text = _pick(TextConfig, d.get("text_config") or {})
        if "encoder_hidden_size" not in (d.get("text_config") or {}):
            text = dataclasses.replace(text, encoder_hidden_size=vision.hidden_size)
        return cls(
            vision=vision,
            text=text,
            image_text_hidden_size=int(d.get("image_text_hidden_size", 256)),
        )

    def to_hf_dict(self, architecture: str = ITM_ARCHITECTURE) -> dict[str, Any]:
        """The ``config.json`` dict transformers writes for ``architecture`` (the ITM model, or
        ``BlipForConditionalGeneration``, whose config differs only in that name and the tied
        LM head it declares)."""
        v, t = self.vision, self.text
        tied = {"tie_word_embeddings": True} if architecture == CAPTIONER_ARCHITECTURE else {}
        return {
            "architectures": [architecture],
            **tied,
            "image_text_hidden_size": self.image_text_hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "label_smoothing": 0.0,
            "logit_scale_init_value": 2.6592,
            "model_type": "blip",
            "projection_dim": 512,
            "text_config": {
                "attention_probs_dropout_prob": 0.0,
                "bos_token_id": DEC_TOKEN_ID,
                "encoder_hidden_size": t.encoder_hidden_size,
                "eos_token_id": 2,
                "hidden_act": t.hidden_act,
                "hidden_dropout_prob": 0.0,
                "hidden_size": t.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": t.intermediate_size,
                "is_decoder": True,
                "layer_norm_eps": t.layer_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "model_type": "blip_text_model",
                "num_attention_heads": t.num_attention_heads,
                "num_hidden_layers": t.num_hidden_layers,
                "pad_token_id": t.pad_token_id,
                "projection_dim": 768,
                "sep_token_id": SEP_TOKEN_ID,
                **tied,
                "use_cache": True,
                "vocab_size": t.vocab_size,
            },
            "vision_config": {
                "attention_dropout": 0.0,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "image_size": v.image_size,
                "initializer_range": 1e-10,
                "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.layer_norm_eps,
                "model_type": "blip_vision_model",
                "num_attention_heads": v.num_attention_heads,
                "num_hidden_layers": v.num_hidden_layers,
                "patch_size": v.patch_size,
                "projection_dim": 512,
            },
        }

    # -- presets ------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, *, text_heads: int | None = None) -> BlipConfig:
        """``base`` / ``large``: the real architectures. ``tiny``: odd sizes for fast tests.

        ``text_heads`` sets ``text_config.num_attention_heads`` as a hub file would carry it (the
        flickr base repo says 8, the corrected repos 12).
        """
        if name == "base":
            cfg = cls()
        elif name == "large":
            cfg = cls(
                vision=VisionConfig(
                    hidden_size=1024,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    intermediate_size=4096,
                ),
                text=TextConfig(encoder_hidden_size=1024),
            )
        elif name == "tiny":
            # Widths are multiples of 64 so that head_dim 64 (the BLIP protocol, and the head count
            # inferred for a .pth file) applies; the hub-style text value is 4 heads of 48, so the
            # protocol override is exercised. Vision and text widths differ to catch mix-ups.
            cfg = cls(
                vision=VisionConfig(
                    hidden_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=200,
                    image_size=48,
                    patch_size=16,
                ),
                text=TextConfig(
                    hidden_size=192,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=96,
                    encoder_hidden_size=128,
                ),
            )
        else:
            raise ValueError(f"unknown preset {name!r}: expected 'tiny', 'base' or 'large'")
        if text_heads is not None:
            cfg = dataclasses.replace(
                cfg, text=dataclasses.replace(cfg.text, num_attention_heads=text_heads)
            )
        return cfg


def _pick(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in names:
            kwargs[key] = float(value) if key == "layer_norm_eps" else value
    return cls(**kwargs)
