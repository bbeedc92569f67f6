"""Result types of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blipitm.config import BlipConfig, Override


@dataclass(frozen=True)
class PairScores:
    """Scores of zipped (image, text) pairs; every field has ``N`` rows."""

    itm_probability: np.ndarray  # [N] float32, softmax(itm_logits)[:, 1]
    itm_logits: np.ndarray  # [N, 2] float32, class 1 = match
    itc_cosine: np.ndarray  # [N] float32

    def __len__(self) -> int:
        return int(self.itm_probability.shape[0])


@dataclass(frozen=True)
class MatrixScores:
    """Scores of every image against every text: ``[I, T]`` (logits ``[I, T, 2]``)."""

    itm_probability: np.ndarray
    itm_logits: np.ndarray
    itc_cosine: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.itc_cosine.shape[0]), int(self.itc_cosine.shape[1]))


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate; ``index`` points into the candidates passed to ``rank``."""

    index: int
    score: float
    itm_probability: float
    itc_cosine: float


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded and how it runs; logged at load and served by ``/v1/models``."""

    source: str
    kind: str  # "hf" or "pth"
    revision: str | None
    commit: str | None
    protocol: str
    device: str
    dtype: str
    config: BlipConfig
    overrides: list[Override] = field(default_factory=list)
    compute_dtype: str = "float32"  # may be wider than ``dtype`` (see engine.devices)

    @property
    def embedding_dim(self) -> int:
        return self.config.image_text_hidden_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.kind,
            "revision": self.revision,
            "commit": self.commit,
            "protocol": self.protocol,
            "device": self.device,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "embedding_dim": self.embedding_dim,
            "image_size": self.config.vision.image_size,
            "overrides": [
                {"field": o.field, "loaded": o.loaded, "used": o.used, "reason": o.reason}
                for o in self.overrides
            ],
        }
