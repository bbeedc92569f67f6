"""Independent references built from transformers (test-only dependency).

``protocol="transformers"``: ``BlipForImageTextRetrieval`` + ``BlipImageProcessorPil`` +
``BertTokenizerFast`` exactly as a transformers user runs them.

``protocol="blip"``: the same transformers modules reconfigured with what Salesforce BLIP uses
(docs/architecture.md, "Two protocols"): text head_dim 64, vision LayerNorm eps 1e-6, ``[ENC]`` as
the first id of the ITM pass, captions cleaned by BLIP's ``pre_caption`` (transcribed below from
``data/utils.py``) and truncated to 35 tokens, and images converted with ``PIL .convert("RGB")``
(alpha dropped).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
)

# What Salesforce BLIP runs with, written here from its sources rather than taken from blipitm,
# so a wrong constant in blipitm cannot make the reference agree with it.
ENC = 30523  # models/blip.py init_tokenizer: [ENC] added after [DEC] to bert-base-uncased (30522)
BLIP_VISION_LN_EPS = 1e-6  # models/vit.py: norm_layer = partial(nn.LayerNorm, eps=1e-6)
BLIP_TEXT_HEAD_DIM = 64  # configs/med_config.json: hidden_size 768, num_attention_heads 12
BLIP_MAX_TOKENS = 35  # models/blip_retrieval.py: tokenizer(..., max_length=35)


def blip_pre_caption(caption: str, max_words: int = 30) -> str:
    """Literal transcription of Salesforce BLIP ``data/utils.py: pre_caption``."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@dataclass
class Reference:
    model: BlipForImageTextRetrieval
    tokenizer: BertTokenizerFast
    processor: BlipImageProcessorPil
    protocol: str

    @classmethod
    def load(cls, ckpt_dir: Path, protocol: str) -> Reference:
        cfg_dict = json.loads((ckpt_dir / "config.json").read_text())
        if protocol == "blip":
            text = cfg_dict["text_config"]
            text["num_attention_heads"] = text["hidden_size"] // BLIP_TEXT_HEAD_DIM
            cfg_dict["vision_config"]["layer_norm_eps"] = BLIP_VISION_LN_EPS
        config = BlipConfig.from_dict(cfg_dict)
        model = BlipForImageTextRetrieval.from_pretrained(ckpt_dir, config=config).eval()
        tokenizer = BertTokenizerFast.from_pretrained(ckpt_dir)
        assert len(tokenizer) >= 30522, "transformers built a truncated vocabulary"
        size = config.vision_config.image_size
        processor = BlipImageProcessorPil(size={"height": size, "width": size})
        return cls(model, tokenizer, processor, protocol)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        if self.protocol == "blip":
            # BLIP reads the pixels of .convert("RGB") (torchvision ToTensor). Rebuild from the
            # array: Pillow leaves a palette's transparent colour in .info, and transformers
            # would composite that colour key onto white, which BLIP never does.
            images = [Image.fromarray(np.asarray(im.convert("RGB"))) for im in images]
        return self.processor(images, return_tensors="pt").pixel_values

    def tokens(self, texts: list[str], *, itm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.protocol == "blip":
            enc = self.tokenizer(
                [blip_pre_caption(t) for t in texts],
                padding="longest",
                truncation=True,
                max_length=BLIP_MAX_TOKENS,
                return_tensors="pt",
            )
            ids = enc.input_ids.clone()
            if itm:
                ids[:, 0] = ENC
            return ids, enc.attention_mask
        enc = self.tokenizer(texts, padding="longest", return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def matrix(self, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(itm_logits [I, T, 2], itc_cosine [I, T])`` through the model's own forward."""
        pv = self.pixel_values(images)
        ids, mask = self.tokens(texts, itm=True)
        logits = [
            self.model(
                input_ids=ids,
                pixel_values=pv[i : i + 1].expand(len(texts), -1, -1, -1),
                attention_mask=mask,
            ).itm_score
            for i in range(len(images))
        ]
        ids, mask = self.tokens(texts, itm=False)
        cosine = self.model(
            input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=False
        ).itm_score
        return torch.stack(logits).numpy(), cosine.numpy()
