"""Result types of the public API: numpy arrays and plain values, never torch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from blipitm.config import BlipConfig, Task
from blipitm.scoring import Override, ProtocolName

# Tensor (compute, feature) dtypes by name; torch.dtype exists only inside engine/ and model/.
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[Dtype, ...] = ("float32", "bfloat16", "float16")
# How a model's weights are held: a tensor dtype, or "int8" (dynamic int8 linear layers, an
# opt-in trading accuracy for speed on CPUs; see the README).
WeightDtype = Literal["float32", "bfloat16", "float16", "int8"]
WEIGHT_DTYPE_NAMES: tuple[WeightDtype, ...] = (*DTYPE_NAMES, "int8")
# How each dtype is held in numpy, which has no bfloat16: as its raw 16 bits.
NUMPY_DTYPES: dict[Dtype, type[np.floating[Any]] | type[np.uint16]] = {
    "float32": np.float32,
    "bfloat16": np.uint16,
    "float16": np.float16,
}


@dataclass(frozen=True)
class BatchSizes:
    """Rows per forward pass. Defaults are tuned per device in
    :func:`blipitm.engine.devices.default_batch_sizes`."""

    images: int
    texts: int  # ITM / ITC text rows


@dataclass(frozen=True)
class PairScores:
    """Scores of zipped (image, text) pairs; the score fields have ``N`` rows.

    ``text_tokens`` has one entry per text the call read (``score_pairs``' ``texts``; ``score``'s
    texts, one if a single text was broadcast), not per pair: see :meth:`Engine.count_tokens`.
    """

    itm_probability: np.ndarray  # [N] float32, softmax(itm_logits)[:, 1]
    itm_logits: np.ndarray  # [N, 2] float32, class 1 = match
    itc_cosine: np.ndarray  # [N] float32
    text_tokens: np.ndarray  # [T] int64, tokens the model read per text

    def __len__(self) -> int:
        return int(self.itm_probability.shape[0])


@dataclass(frozen=True)
class MatrixScores:
    """Scores of every image against every text: ``[I, T]`` (logits ``[I, T, 2]``)."""

    itm_probability: np.ndarray
    itm_logits: np.ndarray
    itc_cosine: np.ndarray
    text_tokens: np.ndarray  # [T] int64, tokens the model read per text (column)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.itc_cosine.shape[0]), int(self.itc_cosine.shape[1]))


@dataclass(frozen=True)
class TextFeatures:
    """Encoded texts: unit-norm ITC embeddings and the tokens the model read for each."""

    embeddings: np.ndarray  # [N, E] float32
    text_tokens: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate; ``index`` points into the candidates passed to ``rank``."""

    index: int
    score: float
    itm_probability: float
    itc_cosine: float


class Ranking(list[Ranked]):
    """What ``rank_texts`` / ``rank_images`` return: the kept candidates best first, as a plain
    list, and ``text_tokens``, the tokens the model read for all the call's texts together."""

    def __init__(self, ranked: Iterable[Ranked] = (), *, text_tokens: int) -> None:
        super().__init__(ranked)
        self.text_tokens = text_tokens


@dataclass(frozen=True)
class ImageFeatures:
    """A batch of encoded images: vision tokens (for ITM) and unit-norm ITC embeddings.

    ``tokens`` come from :meth:`Engine.encode_images` in the engine's compute dtype, so they can
    be stored and handed back (:meth:`Engine.score_pairs`) without loss; :meth:`astype` converts
    them for storage (an index keeps float16).
    """

    tokens: np.ndarray  # [N, T, Dv] float32, float16, or bfloat16 as uint16 bits
    embeddings: np.ndarray  # [N, E] float32

    def __post_init__(self) -> None:
        if self.tokens.dtype not in [np.dtype(t) for t in NUMPY_DTYPES.values()]:
            raise TypeError(
                "tokens must be float32, float16 or bfloat16 bits (uint16), "
                f"got {self.tokens.dtype}"
            )

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def token_dtype(self) -> Dtype:
        return next(name for name, t in NUMPY_DTYPES.items() if self.tokens.dtype == t)

    def astype(self, dtype: Dtype) -> ImageFeatures:
        """The same features with tokens in ``dtype``: no copy if they are in it already;
        rounded to nearest-even when narrowing, as torch's conversions do."""
        if dtype == self.token_dtype:
            return self
        wide = _bf16_to_f32(self.tokens) if self.token_dtype == "bfloat16" else self.tokens
        tokens = _f32_to_bf16(wide) if dtype == "bfloat16" else wide.astype(NUMPY_DTYPES[dtype])
        return ImageFeatures(tokens, self.embeddings)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 held as uint16 bits -> float32 (exact: bfloat16 is float32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 (or narrower) -> bfloat16 as uint16 bits, rounded to nearest-even."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)  # room for the carry of the largest values
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)  # the carry would turn NaN into inf


@dataclass(frozen=True)
class CaptionResult:
    """The captions of one image (:meth:`blipitm.engine.captioner.Captioner.caption`), best first
    for beam search, as drawn for sampling."""

    captions: list[str]  # without the prompt
    tokens: list[int]  # tokens generated for each caption (the closing [SEP] not counted)
    prompt_tokens: int  # the prompt's tokens before each caption ([DEC] included)
    # Per caption, how it ended: "stop" (the search produced [SEP]) or "length" (max_length came
    # first; the caption may be cut mid-sentence).
    finish_reasons: list[str]


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded and how it runs; logged at load and served by ``/v1/models``."""

    source: str
    kind: str  # "hf" or "pth"
    revision: str | None
    commit: str | None
    protocol: ProtocolName
    device: str
    dtype: WeightDtype
    config: BlipConfig
    overrides: list[Override] = field(default_factory=list)
    compute_dtype: Dtype = "float32"  # may be wider than ``dtype`` (see engine.devices)
    task: Task = "itm"  # the model loaded: image-text matching, or the captioner

    @property
    def embedding_dim(self) -> int:
        return self.config.image_text_hidden_size

    @property
    def image_tokens(self) -> int:
        """Vision tokens per image: the patches plus CLS (577 at 384 px with 16 px patches)."""
        return self.config.vision.num_patches + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "task": self.task,
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
