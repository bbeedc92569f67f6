"""Convert an original BLIP / LAVIS retrieval checkpoint into a Hugging Face directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blipitm.checkpoint import layout
from blipitm.checkpoint.io import write_safetensors
from blipitm.checkpoint.load import load_weights
from blipitm.checkpoint.resolve import resolve
from blipitm.config import ITM_ARCHITECTURE
from blipitm.errors import CheckpointError

# Files of ours that an overwrite must not leave behind: a stale pytorch_model.bin or shard index
# beside the new model.safetensors would be ambiguous to other tools.
_STALE = (layout.BIN_NAME, layout.SAFETENSORS_INDEX_NAME, layout.PROCESSOR_CONFIG_NAME)


def convert_to_hf(
    src_pth: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``src_pth`` as ``config.json`` + ``model.safetensors`` + tokenizer + image settings.

    The config is inferred from the tensor shapes with BLIP's own values (text heads width // 64,
    i.e. 12 for base, not the 8 of the flickr hub config; vision LayerNorm eps 1e-6). Momentum
    encoders, queues and ``position_ids`` are dropped; tensors are checked strictly before
    anything is written. ``tokenizer`` is a directory or hub id whose files are copied (default:
    one beside ``src_pth``, else ``bert-base-uncased``). Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"output directory {out} is not empty; pass overwrite=True (--overwrite) to replace "
            "its files"
        )
    resolved = resolve(src_pth, tokenizer=tokenizer)
    state_dict = load_weights(resolved)

    out.mkdir(parents=True, exist_ok=True)
    same_dir = resolved.tokenizer_dir.resolve() == out.resolve()
    # A tokenizer.json left from an earlier run would win over a newly copied vocab.txt.
    for name in _STALE + (() if same_dir else layout.TOKENIZER_FILES):
        (out / name).unlink(missing_ok=True)
    architecture = resolved.config_dict.get("architectures", [ITM_ARCHITECTURE])[0]
    layout.write_json(
        out / layout.CONFIG_NAME, layout.hf_config_dict(resolved.config, architecture)
    )
    write_safetensors(state_dict, out / layout.SAFETENSORS_NAME)
    _copy_tokenizer(resolved.tokenizer_dir, out)
    layout.write_json(
        out / layout.PREPROCESSOR_CONFIG_NAME,
        {**resolved.image_settings_dict, "processor_class": "BlipProcessor"},
    )
    return out


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in layout.TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    # A tokenizer given as a bare vocab.txt: record the uncased BERT settings BLIP uses, so that
    # every tool reading the directory builds the same tokenizer.
    if not (out / layout.TOKENIZER_CONFIG_NAME).is_file():
        layout.write_json(out / layout.TOKENIZER_CONFIG_NAME, layout.tokenizer_config_dict())
    if not (out / layout.SPECIAL_TOKENS_MAP_NAME).is_file():
        layout.write_json(out / layout.SPECIAL_TOKENS_MAP_NAME, dict(layout.SPECIAL_TOKENS))
