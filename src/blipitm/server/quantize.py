"""Embeddings as Cohere's ``embedding_types`` and Voyage's ``output_dtype``: float, int8, uint8,
binary, ubinary. Fixed, stateless rules (docs/server.md, "Integer embeddings"), so a vector's
integer form depends on that vector alone, never on the request it came in or a calibration set:

- ``uint8``: each component ``x`` (in [-1, 1]: the embeddings are unit norm) mapped linearly onto
  0..255, ``clip(rint((x + 1) * 127.5), 0, 255)``, computed in float64, ties to even;
- ``int8``: ``uint8 - 128``, so -128..127 and 0.0 is 0;
- ``ubinary``: one bit per component, 1 where ``x > 0``, packed 8 to a byte with the first
  component in the most significant bit (``numpy.packbits``): ``ceil(dim / 8)`` values 0..255;
- ``binary``: ``ubinary - 128`` as int8, -128..127 (Cohere's and Voyage's offset binary).
"""

from __future__ import annotations

import base64
from typing import Literal, get_args

import numpy as np

EmbeddingDtype = Literal["float", "int8", "uint8", "binary", "ubinary"]
DTYPES: tuple[str, ...] = get_args(EmbeddingDtype)


def quantize(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """``[N, E]`` float32 unit-norm embeddings in ``dtype``: float32 ``[N, E]``, int8 or uint8
    ``[N, E]``, or (binary, ubinary) int8 or uint8 ``[N, ceil(E / 8)]``."""
    if dtype == "float":
        return np.asarray(vectors, dtype=np.float32)
    if dtype in ("uint8", "int8"):
        levels = np.rint((np.asarray(vectors, dtype=np.float64) + 1.0) * 127.5)
        unsigned = np.clip(levels, 0, 255).astype(np.uint8)
    elif dtype in ("ubinary", "binary"):
        unsigned = np.packbits(np.asarray(vectors) > 0, axis=-1, bitorder="big")
    else:
        raise ValueError(f"unknown embedding dtype {dtype!r}; expected one of {DTYPES}")
    if dtype.startswith("u"):
        return unsigned
    return (unsigned.astype(np.int16) - 128).astype(np.int8)


def as_lists(array: np.ndarray) -> list[list[float]] | list[list[int]]:
    """Rows as JSON lists: Python floats for float32 (as ``float(x)`` each), ints otherwise."""
    out: list[list[float]] | list[list[int]] = array.tolist()
    return out


def as_base64(row: np.ndarray) -> str:
    """One row's bytes, base64-encoded: little-endian float32, or the int8 / uint8 bytes."""
    data = row.astype("<f4") if row.dtype == np.float32 else row
    return base64.b64encode(np.ascontiguousarray(data).tobytes()).decode("ascii")
