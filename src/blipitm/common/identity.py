"""Which model produced a set of embeddings, and whether an engine is that model.

The hub id or path of a model says little on its own (a local directory can be rewritten, the
same weights can live at two paths), so besides the engine's :class:`ModelInfo` we record a
*probe*: the ITC embeddings of one fixed synthetic image and one fixed caption. Two engines with
the same weights and protocol give the same probe up to dtype/device rounding; different weights
give unrelated vectors. Protocol is checked by name too, because under ``blip`` vs
``transformers`` only some numbers move (text cleanup, vision LayerNorm eps).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine

PROBE_TEXT = "A photo of a dog running on the grass, next to a red car."
# Same weights in bf16 vs fp32 keep the probe cosine above ~0.999; unrelated weights give ~0.
PROBE_MIN_COSINE = 0.99


def probe_image() -> np.ndarray:
    """A fixed 64x64 RGB pattern (gradients and a block), identical on every platform."""
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    img[16:40, 24:48] = (200, 30, 60)
    return img


def model_probe(engine: Engine) -> dict[str, list[float]]:
    image = engine.embed_images([probe_image()])[0]
    text = engine.embed_texts([PROBE_TEXT])[0]
    return {
        "image": [round(float(v), 7) for v in image],
        "text": [round(float(v), 7) for v in text],
    }


def recorded_source(source: str) -> str:
    """A model's source as a manifest records it: a local path (which wins, as in resolve())
    made absolute, so that it is found from any directory; a hub id as it is."""
    if os.path.exists(os.path.expanduser(source)):
        return os.path.abspath(os.path.expanduser(source))
    return source


def model_record(engine: Engine) -> dict[str, Any]:
    """What a manifest stores about the model: its info plus the probe. A local source is
    recorded as an absolute path, so that the index finds its model from any directory."""
    info = engine.info
    return {
        "source": recorded_source(info.source),
        "format": info.kind,
        "revision": info.revision,
        "commit": info.commit,
        "protocol": info.protocol,
        "dtype": info.dtype,
        "embedding_dim": info.embedding_dim,
        "probe": model_probe(engine),
    }


def mismatch(recorded: dict[str, Any], engine: Engine) -> str | None:
    """Why ``engine`` is not the recorded model, or None when it is."""
    info = engine.info
    want = f"{recorded.get('source')} (revision {recorded.get('revision')}, " + (
        f"protocol {recorded.get('protocol')}, dtype {recorded.get('dtype')})"
    )
    if recorded.get("protocol") != info.protocol:
        return (
            f"it was built with protocol {recorded.get('protocol')!r} but the model is loaded "
            f"with protocol {info.protocol!r}; load {want} with --protocol "
            f"{recorded.get('protocol')}"
        )
    if recorded.get("embedding_dim") != info.embedding_dim:
        return (
            f"its embeddings are {recorded.get('embedding_dim')}-d but the loaded model's are "
            f"{info.embedding_dim}-d; load {want}"
        )
    probe = recorded.get("probe") or {}
    now = model_probe(engine)
    for kind in ("image", "text"):
        old = np.asarray(probe.get(kind, []), dtype=np.float64)
        new = np.asarray(now[kind], dtype=np.float64)
        if old.shape != new.shape or float(old @ new) < PROBE_MIN_COSINE:
            return (
                f"it was built with different model weights ({want}) than the loaded "
                f"{info.source} (revision {info.revision}); load the model it was built with"
            )
    return None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def weights_digest(source: str) -> str | None:
    """SHA-256 over a local model's weight files (names and bytes); None for a hub id (its
    commit pins it)."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fp:
            while chunk := fp.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
