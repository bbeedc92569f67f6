"""The scoring protocol: every difference between ``protocol="blip"`` and ``"transformers"``.

Both protocols run the same weights (docs/architecture.md, "Two protocols"); they differ only in the
values held here. A name is parsed once at the edge (:func:`get_protocol`) and the resulting
:class:`ScoringProtocol` is asked by the engine, preprocessing, search and evaluation, so that no
other module decides anything by the protocol's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from blipitm.config import (
    BLIP_TEXT_HEAD_DIM,
    BLIP_VISION_LN_EPS,
    CLS_TOKEN_ID,
    ENC_TOKEN_ID,
    BlipConfig,
)
from blipitm.errors import InvalidInputError

ProtocolName = Literal["blip", "transformers"]
PROTOCOL_NAMES: tuple[ProtocolName, ...] = ("blip", "transformers")

BLIP_MAX_TEXT_TOKENS = 35  # train_retrieval.py: max_length=35
BLIP_MAX_CAPTION_WORDS = 30  # data/flickr30k_dataset.py: max_words=30


@dataclass(frozen=True)
class Override:
    """One config value that a protocol changed relative to the loaded ``config.json``."""

    field: str
    loaded: Any
    used: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.loaded} -> {self.used} ({self.reason})"


@dataclass(frozen=True)
class ScoringProtocol:
    """How one protocol turns inputs into scores (why: docs/architecture.md, "Two protocols")."""

    name: ProtocolName
    itm_first_token: int  # replaces [CLS] as the first token of the ITM pass
    caption_max_words: int | None  # BLIP's pre_caption, keeping this many words; None: as given
    max_text_tokens: int | None  # truncate to this many; None: refuse texts past the model limit
    alpha_on_white: bool  # composite transparency onto white (transformers 5.x), else drop it
    text_head_dim: int | None  # text heads follow from this head size, whatever config.json says
    vision_layer_norm_eps: float | None  # used instead of config.json's value
    rank_by: Literal["itm_logit_plus_cosine", "itm_probability"]

    def configure(self, config: BlipConfig) -> tuple[BlipConfig, list[Override]]:
        """The config this protocol runs with, and what differs from ``config`` (for the log and
        ``/v1/models``)."""
        overrides: list[Override] = []
        text, vision = config.text, config.vision
        if self.text_head_dim is not None:
            heads = text.hidden_size // self.text_head_dim
            if heads >= 1 and text.num_attention_heads != heads:
                overrides.append(
                    Override(
                        "text_config.num_attention_heads",
                        text.num_attention_heads,
                        heads,
                        "BLIP uses head_dim 64 (transformers#22625)",
                    )
                )
                text = dataclasses.replace(text, num_attention_heads=heads)
        eps = self.vision_layer_norm_eps
        if eps is not None and vision.layer_norm_eps != eps:
            overrides.append(
                Override(
                    "vision_config.layer_norm_eps",
                    vision.layer_norm_eps,
                    eps,
                    "BLIP's ViT uses eps 1e-6 (LAVIS#106)",
                )
            )
            vision = dataclasses.replace(vision, layer_norm_eps=eps)
        return dataclasses.replace(config, vision=vision, text=text), overrides

    def rank_score(self, itm_logits: np.ndarray, itc_cosine: np.ndarray) -> np.ndarray:
        """What candidates are ranked by: ``[N, 2]`` logits and ``[N]`` cosines -> ``[N]``."""
        if self.rank_by == "itm_probability":
            return itm_probability(itm_logits)
        return blip_retrieval_score(itm_logits[:, 1], itc_cosine)


BLIP = ScoringProtocol(
    name="blip",
    itm_first_token=ENC_TOKEN_ID,
    caption_max_words=BLIP_MAX_CAPTION_WORDS,
    max_text_tokens=BLIP_MAX_TEXT_TOKENS,
    alpha_on_white=False,  # BLIP's and LAVIS' datasets call PIL .convert("RGB")
    text_head_dim=BLIP_TEXT_HEAD_DIM,
    vision_layer_norm_eps=BLIP_VISION_LN_EPS,
    rank_by="itm_logit_plus_cosine",  # train_retrieval.py evaluation
)
TRANSFORMERS = ScoringProtocol(
    name="transformers",
    itm_first_token=CLS_TOKEN_ID,  # transformers never inserts [ENC] (transformers#22732)
    caption_max_words=None,
    max_text_tokens=None,
    alpha_on_white=True,  # image_transforms.convert_to_rgb
    text_head_dim=None,
    vision_layer_norm_eps=None,
    rank_by="itm_probability",
)
PROTOCOLS: dict[ProtocolName, ScoringProtocol] = {p.name: p for p in (BLIP, TRANSFORMERS)}


def get_protocol(name: str) -> ScoringProtocol:
    """The protocol called ``name``; the one place where a name is checked."""
    if name not in PROTOCOLS:
        raise InvalidInputError(f"must be one of {PROTOCOL_NAMES}, got {name!r}", loc=("protocol",))
    return PROTOCOLS[cast(ProtocolName, name)]


def itm_probability(itm_logits: np.ndarray) -> np.ndarray:
    """``softmax(itm_logits)[..., 1]`` in float32: ``[..., 2]`` -> ``[...]``."""
    z = itm_logits - itm_logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e[..., 1] / e.sum(axis=-1)).astype(np.float32)


def blip_retrieval_score(positive_logit: np.ndarray, itc_cosine: np.ndarray) -> np.ndarray:
    """BLIP's retrieval score (``train_retrieval.py`` ``evaluation``): ``itm_logits[:, 1]`` plus
    the ITC cosine, both float32."""
    score: np.ndarray = positive_logit + itc_cosine
    return score
