"""Reading and writing tensor files: safetensors, sharded safetensors, and torch pickles.

Torch pickles are loaded with ``weights_only=True`` only (DESIGN.md §2): a checkpoint is data, and
unpickling arbitrary objects would run code from the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blipitm.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json

# Wrappers that training scripts put around the state dict: BLIP/LAVIS save {"model": sd},
# Lightning-style and many others {"state_dict": sd}.
_WRAPPER_KEYS = ("model", "state_dict")
_ZIP_MAGIC = b"PK\x03\x04"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file onto the CPU.

    ``.safetensors``, a sharded ``*.index.json`` and ``.bin``/``.pth``/``.pt`` pickles (read with
    ``weights_only=True``, memory-mapped where the file format allows). A ``{"model": sd}`` or
    ``{"state_dict": sd}`` wrapper is unwrapped. Any failure is a :class:`CheckpointError`.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if p.name.endswith(INDEX_SUFFIX):
        return _read_sharded(p)
    if p.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(p)
    return _as_state_dict(_read_pickle(p), p)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not safetensors ({e}); "
            "download or convert it again"
        ) from e


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read shard index {index_path}: {e}") from e
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"shard index {index_path} names missing files: {', '.join(missing)}")
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(read_state_dict(index_path.parent / shard))
    return out


def _read_pickle(path: Path) -> Any:
    # mmap needs the zip format that torch.save has written since 1.6; legacy files load eagerly.
    # Check the leading magic (as torch does), not zipfile.is_zipfile, which looks at the end of
    # the file and so says yes to a zip whose header was damaged.
    with path.open("rb") as f:
        mmap = f.read(4) == _ZIP_MAGIC
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only names the class it refused ("Unsupported global: GLOBAL datetime.datetime");
        # garbage bytes fail differently ("Unsupported operand 175") and are corruption.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"cannot load {path}: refusing to unpickle arbitrary objects; this is not a plain "
                f"tensor checkpoint (it contains a {refused.group(1)} object, which "
                "torch.load(weights_only=True) rejects). Re-save only the tensors, as "
                "{'model': model.state_dict()} or as safetensors."
            ) from e
        raise _corrupt(path, e) from e
    except Exception as e:
        # Unpickling garbage fails in many ways (KeyError, EOFError, RuntimeError, OSError, ...);
        # all mean the same thing to the user.
        raise _corrupt(path, e) from e


def _corrupt(path: Path, cause: BaseException) -> CheckpointError:
    detail = str(cause).splitlines()[0] if str(cause) else ""
    if detail.startswith("Weights only load failed"):
        detail = "invalid pickle data"  # torch's advice about weights_only=False does not apply
    return CheckpointError(
        f"cannot load {path}: the file is truncated, corrupted or not a PyTorch checkpoint "
        f"({type(cause).__name__}: {detail}); download or convert it again"
    )


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds a dict without tensors; this is not a model checkpoint"
        )
    others = [repr(k) for k in obj if k not in tensors]
    if others:
        listed = ", ".join(others[:10]) + (
            f" and {len(others) - 10} more" if len(others) > 10 else ""
        )
        raise CheckpointError(f"{path}: entries that are not tensors: {listed}")
    return tensors


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write tensors as safetensors with the ``format: pt`` metadata transformers expects."""
    p = Path(path)
    # safetensors refuses views and shared storage; contiguous copies are what gets written anyway.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p
