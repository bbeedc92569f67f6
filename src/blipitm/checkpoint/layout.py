"""The files of a Hugging Face BLIP directory, and the small JSON documents we write into one.

Two layouts exist in the wild: the Salesforce hub repos (``vocab.txt``, ``tokenizer.json``,
``preprocessor_config.json``) and what today's transformers ``save_pretrained`` writes
(``tokenizer.json`` only, image settings nested in ``processor_config.json``). We read both and
write the hub one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blipitm.config import IMAGE_MEAN, IMAGE_STD, ITM_ARCHITECTURE, BlipConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
# Weight files of an HF directory, most preferred first: safetensors cannot run code and maps
# lazily; the hub repos ship only the .bin.
WEIGHTS_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME)

VOCAB_NAME = "vocab.txt"
TOKENIZER_JSON_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
# Either file alone is enough for processing.tokenizer to rebuild the WordPiece tokenizer.
TOKENIZER_VOCAB_NAMES = (TOKENIZER_JSON_NAME, VOCAB_NAME)
TOKENIZER_FILES = (VOCAB_NAME, TOKENIZER_JSON_NAME, TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"  # hub layout
PROCESSOR_CONFIG_NAME = "processor_config.json"  # save_pretrained layout, {"image_processor": ...}

# What config.json records about its writer; transformers only reads it for warnings.
TRANSFORMERS_VERSION = "5.0.0"

SPECIAL_TOKENS = {
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "unk_token": "[UNK]",
}


def hf_config_dict(config: BlipConfig, architecture: str = ITM_ARCHITECTURE) -> dict[str, Any]:
    """``config.json`` as transformers writes it for ``architecture`` in float32."""
    return {
        **config.to_hf_dict(architecture),
        "dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
    }


def image_processor_dict(image_size: int) -> dict[str, Any]:
    """``BlipImageProcessor`` settings: bicubic resize to a square, /255, CLIP mean/std."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_processor_type": "BlipImageProcessor",
        "image_std": list(IMAGE_STD),
        "resample": 3,  # PIL.Image.BICUBIC
        "rescale_factor": 0.00392156862745098,  # 1/255
        "size": {"height": image_size, "width": image_size},
    }


def preprocessor_config_dict(image_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of the hub layout."""
    return {**image_processor_dict(image_size), "processor_class": "BlipProcessor"}


def processor_config_dict(image_size: int) -> dict[str, Any]:
    """``processor_config.json`` of the ``save_pretrained`` layout."""
    return {"image_processor": image_processor_dict(image_size), "processor_class": "BlipProcessor"}


def tokenizer_config_dict() -> dict[str, Any]:
    """``tokenizer_config.json``: uncased BERT WordPiece, as the Salesforce repos carry it."""
    return {
        **SPECIAL_TOKENS,
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "model_max_length": 512,
        "never_split": None,
        "processor_class": "BlipProcessor",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
    }


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    p = Path(path)
    p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p
