"""Reading and writing tensor files: safetensors, sharded safetensors, and torch pickles.

Torch pickles are loaded with ``weights_only=True`` only (docs/architecture.md, "The model"): a
checkpoint is data, and unpickling arbitrary objects would run code from the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from blipitm.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json

# Wrappers that training scripts put around the state dict: BLIP/LAVIS save {"model": sd},
# Lightning-style and many others {"state_dict": sd}.
_WRAPPER_KEYS = ("model", "state_dict")
_ZIP_MAGIC = b"PK\x03\x04"


def read_state_dict(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file onto the CPU.

    ``.safetensors``, a sharded ``*.index.json`` and ``.bin``/``.pth``/``.pt`` pickles (read with
    ``weights_only=True``, memory-mapped where the file format allows). A ``{"model": sd}`` or
    ``{"state_dict": sd}`` wrapper is unwrapped. Any failure is a :class:`CheckpointError`.
    ``dtype`` converts floating tensors one at a time as they are read.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if p.name.endswith(INDEX_SUFFIX):
        return _read_sharded(p, dtype)
    if p.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(p, dtype)
    state_dict = _as_state_dict(_read_pickle(p), p)
    for key, tensor in state_dict.items():  # memory-mapped: converting one at a time is cheap
        state_dict[key] = _convert(tensor, dtype)
    return state_dict


def _convert_needed(stored: torch.dtype, dtype: torch.dtype | None) -> bool:
    return dtype is not None and stored.is_floating_point and stored != dtype


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if _convert_needed(tensor.dtype, dtype) else tensor


# safetensors dtype tags (https://github.com/huggingface/safetensors, format section).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Read tensor by tensor with ``readinto`` into fresh tensors, converting each as it comes.

    The safetensors library memory-maps the whole file, and every touched page counts toward
    the process's resident memory until the file is closed: a bf16 load of fp32 weights would
    peak at 1.5x the fp32 size. Reading into place peaks at the result plus one tensor.
    """
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", _read_exact(f, 8))
            if header_len > 100_000_000:
                raise ValueError(f"header length {header_len} is implausible")
            header = json.loads(_read_exact(f, header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            data_start = 8 + header_len
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            out: dict[str, torch.Tensor] = {}
            scratch = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)  # reused when converting
            for name, info in entries:
                begin, end = (int(x) for x in info["data_offsets"])
                stored = _ST_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                nbytes = math.prod(shape) * stored.itemsize
                if end - begin != nbytes:
                    raise ValueError(f"{name}: {end - begin} bytes for shape {shape}")
                f.seek(data_start + begin)
                if dtype is not None and _convert_needed(stored, dtype):
                    out[name] = _read_converted(f, name, scratch, stored, dtype, shape)
                    continue
                raw = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes and f.readinto(raw.numpy().data) != nbytes:
                    raise ValueError(f"{name}: the file ends inside this tensor")
                out[name] = raw.view(stored).reshape(shape)
            return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not safetensors ({e}); "
            "download or convert it again"
        ) from e


_CHUNK_BYTES = 8 << 20


def _read_converted(
    f: io.BufferedReader,
    name: str,
    scratch: torch.Tensor,
    stored: torch.dtype,
    dtype: torch.dtype,
    shape: list[int],
) -> torch.Tensor:
    """Read one tensor in chunks through ``scratch``, converting each chunk into place: a bf16
    load of fp32 weights never holds more than one chunk of fp32."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    per_chunk = scratch.numel() // stored.itemsize
    for start in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - start)
        raw = scratch[: n * stored.itemsize]
        if f.readinto(raw.numpy().data) != raw.numel():
            raise ValueError(f"{name}: the file ends inside this tensor")
        flat[start : start + n].copy_(raw.view(stored))
    return out


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data


def _read_sharded(index_path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
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
        out.update(read_state_dict(index_path.parent / shard, dtype=dtype))
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
    # save_file writes a private temp file (0600) and renames it, so the checkpoint would be
    # unreadable to the other users a model directory is shared with: give it the mode every
    # other file gets, 0666 minus the umask.
    p.chmod(0o666 & ~_umask())
    return p


def _umask() -> int:
    # Reading the umask means setting it; the restrictive placeholder keeps files that another
    # thread creates meanwhile private rather than world-writable.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
