"""Write random BLIP checkpoints (the ITM model, or the captioner) in the exact on-disk formats
real ones use.

Every tensor is re-randomised: a default init (zeros, ones) makes a swapped or
skipped tensor invisible, random values make it a numeric mismatch. Scales keep a forward pass
healthy, so ITM probabilities and cosines are informative rather than saturated:

- matrices (linear, patch conv): N(0, 0.8 / sqrt(fan_in)) clipped to [0.02, 0.05], so each
  projection of unit-scale activations has std ~0.8 whatever the width: attention is neither
  uniform nor one-hot and ITM logits stay near ±1. (A flat 0.05 saturates the 12-layer base model,
  ITM ~0.98 for every text; a flat 0.02-0.03 leaves the 2-layer tiny one barely input-dependent.)
- biases: N(0, 0.02); LayerNorm weights 1 + N(0, 0.1), biases N(0, 0.05);
- embeddings (word, position, class): N(0, 0.05).

Usage: ``python -m blipitm.testing.make_checkpoint OUT_DIR --preset tiny --seed 0`` (``--task
caption`` for a ``BlipForConditionalGeneration`` captioner).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from blipitm.checkpoint import layout as hf_layout
from blipitm.checkpoint.io import write_safetensors
from blipitm.checkpoint.keys import (
    TIED_KEYS,
    Shape,
    captioner_expected_shapes,
    expected_shapes,
    original_from_hf,
)
from blipitm.config import CAPTIONER_ARCHITECTURE, ITM_ARCHITECTURE, BlipConfig
from blipitm.testing.vocab import write_tokenizer_files

PTH_NAME = "model_retrieval.pth"
CAPTIONER_PTH_NAME = "model_base_caption_capfilt_large.pth"  # BLIP's released captioner
FORMATS = ("hf", "pth")
TASKS = ("itm", "caption")
LAYOUTS = ("hub", "saved")

# (mean, std) by tensor role; see the module docstring.
MATRIX_GAIN = 0.8  # std = gain / sqrt(fan_in), clipped to MATRIX_STD_RANGE
MATRIX_STD_RANGE = (0.02, 0.05)
BIAS = (0.0, 0.02)
NORM_WEIGHT = (1.0, 0.1)
NORM_BIAS = (0.0, 0.05)
EMBEDDING = (0.0, 0.05)

# ITC queue length of the real checkpoints (configs/retrieval_flickr.yaml); tiny keeps it small.
QUEUE_SIZE = {"tiny": 57, "base": 57600, "large": 57600}
_MOMENTUM_SEED_OFFSET = 1_000_003  # momentum copies must differ from the weights they shadow


def _role(name: str, shape: Shape) -> tuple[float, float]:
    """(mean, std) of a tensor's values, from its name and shape."""
    if "layer_norm" in name or "LayerNorm" in name or "layernorm" in name:
        return NORM_WEIGHT if name.endswith(".weight") else NORM_BIAS
    if name.endswith(("_embedding", "embeddings.weight")):
        return EMBEDDING  # class_embedding, position_embedding, word/position_embeddings
    if name.endswith(".bias"):
        return BIAS
    fan_in = math.prod(shape[1:])  # [out, in] linear, [out, in, kh, kw] patch conv
    low, high = MATRIX_STD_RANGE
    return 0.0, min(max(MATRIX_GAIN / math.sqrt(fan_in), low), high)


def random_tensors(shapes: dict[str, Shape], seed: int) -> dict[str, torch.Tensor]:
    """One tensor per name, drawn in ``shapes`` order from one generator: same seed, same values."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        mean, std = _role(name, shape)
        out[name] = torch.randn(shape, generator=g).mul_(std).add_(mean)
    return out


def random_state_dict(config: BlipConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for ``config`` in Hugging Face names."""
    return random_tensors(expected_shapes(config), seed)


def random_captioner_state_dict(
    config: BlipConfig, seed: int, *, tied_copies: bool = False
) -> dict[str, torch.Tensor]:
    """Random ``BlipForConditionalGeneration`` weights in Hugging Face names; ``tied_copies``
    adds the LM head's tied tensors under their second names, as BLIP's ``.pth`` files and
    transformers 4's ``.bin`` files carry them."""
    weights = random_tensors(captioner_expected_shapes(config), seed)
    if tied_copies:
        for copy, source in TIED_KEYS:
            weights[copy] = weights[source].clone()
    return weights


def _training_extras(
    original: dict[str, torch.Tensor], config: BlipConfig, seed: int, queue_size: int
) -> dict[str, torch.Tensor]:
    """What a real BLIP retrieval checkpoint carries beyond the inference weights
    (models/blip_retrieval.py), all of which loading must drop."""
    towers = ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.")
    momentum_shapes = {
        f"{k.split('.', 1)[0]}_m.{k.split('.', 1)[1]}": tuple(v.shape)
        for k, v in original.items()
        if k.startswith(towers)
    }
    extras = random_tensors(momentum_shapes, seed + _MOMENTUM_SEED_OFFSET)
    g = torch.Generator().manual_seed(seed + 2 * _MOMENTUM_SEED_OFFSET)
    dim = config.image_text_hidden_size
    extras["image_queue"] = torch.nn.functional.normalize(
        torch.randn(dim, queue_size, generator=g), dim=0
    )
    extras["text_queue"] = torch.nn.functional.normalize(
        torch.randn(dim, queue_size, generator=g), dim=0
    )
    extras["idx_queue"] = torch.full((1, queue_size), -100, dtype=torch.long)
    extras["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    extras["temp"] = torch.tensor(0.0717)
    # The legacy BERT buffer, in both text encoders.
    positions = torch.arange(config.text.max_position_embeddings).unsqueeze(0)  # [1, P]
    extras["text_encoder.embeddings.position_ids"] = positions
    extras["text_encoder_m.embeddings.position_ids"] = positions.clone()
    return extras


def make_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "tiny",
    seed: int = 0,
    text_heads: int | None = None,
    fmt: str = "hf",
    layout: str = "hub",
    task: str = "itm",
    tied_copies: bool = False,
) -> Path:
    """Write a random checkpoint into ``out_dir`` (created if needed).

    ``fmt="hf"``: a Hugging Face directory (returned) with config.json, model.safetensors and,
    per ``layout``, the hub repo's tokenizer/preprocessor files (``"hub"``) or what transformers'
    ``save_pretrained`` writes today (``"saved"``). ``fmt="pth"``: the same tensors (same seed,
    same values) as an original BLIP ``{"model": state_dict}`` file with momentum encoders,
    queues and ``position_ids``, tokenizer files beside it; returns the ``.pth`` path.
    ``text_heads`` sets config.json's text head count (the flickr hub file says 8 for base).

    ``task="caption"``: BLIP's captioner instead (``BlipForConditionalGeneration``; a ``.pth``
    holds ``visual_encoder.*`` and ``text_decoder.*`` with the LM head's tied copies, as BLIP's
    ``model_base_caption_capfilt_large.pth``); ``tied_copies`` writes those copies into the
    Hugging Face file too, as the hub's transformers-4 ``.bin`` has them.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "caption":
        return _make_captioner(out_dir, preset, seed, text_heads, fmt, layout, tied_copies)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = BlipConfig.preset(preset, text_heads=text_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = random_state_dict(config, seed)
    write_tokenizer_files(out, layout_name=layout)

    if fmt == "pth":
        original = original_from_hf(weights)
        original |= _training_extras(original, config, seed, QUEUE_SIZE.get(preset, 57))
        path = out / PTH_NAME
        torch.save({"model": original}, path)
        return path

    _write_hf_files(out, config, weights, layout)
    return out


def _make_captioner(
    out_dir: str | os.PathLike[str],
    preset: str,
    seed: int,
    text_heads: int | None,
    fmt: str,
    layout: str,
    tied_copies: bool,
) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    config = BlipConfig.preset(preset, text_heads=text_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out, layout_name=layout)
    if fmt == "pth":
        weights = random_captioner_state_dict(config, seed, tied_copies=True)
        original = original_from_hf(weights)
        positions = torch.arange(config.text.max_position_embeddings).unsqueeze(0)  # [1, P]
        original["text_decoder.bert.embeddings.position_ids"] = positions
        path = out / CAPTIONER_PTH_NAME
        torch.save({"model": original}, path)
        return path
    weights = random_captioner_state_dict(config, seed, tied_copies=tied_copies)
    _write_hf_files(out, config, weights, layout, CAPTIONER_ARCHITECTURE)
    return out


def _write_hf_files(
    out: Path,
    config: BlipConfig,
    weights: dict[str, torch.Tensor],
    layout_name: str,
    architecture: str = ITM_ARCHITECTURE,
) -> None:
    hf_layout.write_json(
        out / hf_layout.CONFIG_NAME, hf_layout.hf_config_dict(config, architecture)
    )
    write_safetensors(weights, out / hf_layout.SAFETENSORS_NAME)
    size = config.vision.image_size
    if layout_name == "hub":
        name, doc = hf_layout.PREPROCESSOR_CONFIG_NAME, hf_layout.preprocessor_config_dict(size)
    else:
        name, doc = hf_layout.PROCESSOR_CONFIG_NAME, hf_layout.processor_config_dict(size)
    hf_layout.write_json(out / name, doc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blipitm.testing.make_checkpoint",
        description="Write a random BLIP checkpoint (every tensor randomised) for tests.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=("tiny", "base", "large"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-heads", type=int, default=None, help="config.json text heads")
    parser.add_argument("--format", choices=FORMATS, default="hf", dest="fmt")
    parser.add_argument("--layout", choices=LAYOUTS, default="hub")
    parser.add_argument("--task", choices=TASKS, default="itm", help="caption: the captioner")
    args = parser.parse_args(argv)
    path = make_checkpoint(
        args.out_dir,
        preset=args.preset,
        seed=args.seed,
        text_heads=args.text_heads,
        fmt=args.fmt,
        layout=args.layout,
        task=args.task,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
