"""The engine's jobs for :class:`blipitm.engine.batcher.Batcher`: one class per engine call.

Each is a frozen record of its inputs with ``run(engine)``; those whose calls concatenate
(embeddings, pair scores) add ``merge(jobs) -> (job, split)``, so requests that arrive together
share one call, and each gets back its own rows and its own texts' token counts. They live beside
the batcher, not with the server's routes, because they are engine calls and nothing else: any
front end (the server, a Batch API, a Ray actor) queues the same ones. A job that needs more than
the engine (the server's index search) lives with its front end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image

from blipitm.engine.batcher import Split
from blipitm.engine.types import CaptionResult, PairScores, Ranking, TextFeatures
from blipitm.explain import Explanation

if TYPE_CHECKING:
    from blipitm.engine.captioner import Captioner
    from blipitm.engine.engine import Engine


def _split(array: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1]) if sizes else []


@dataclass(frozen=True)
class EmbedTexts:
    texts: list[str]

    def run(self, engine: Engine) -> TextFeatures:
        return engine.encode_texts(self.texts)

    @classmethod
    def merge(cls, jobs: Sequence[EmbedTexts]) -> tuple[EmbedTexts, Split]:
        sizes = [len(j.texts) for j in jobs]

        def split(feats: TextFeatures) -> list[TextFeatures]:
            return [
                TextFeatures(e, n)
                for e, n in zip(
                    _split(feats.embeddings, sizes), _split(feats.text_tokens, sizes), strict=True
                )
            ]

        return cls([t for j in jobs for t in j.texts]), split


@dataclass(frozen=True)
class EmbedImages:
    images: list[Any]

    def run(self, engine: Engine) -> np.ndarray:
        return engine.embed_images(self.images)

    @classmethod
    def merge(cls, jobs: Sequence[EmbedImages]) -> tuple[EmbedImages, Split]:
        sizes = [len(j.images) for j in jobs]
        return cls([im for j in jobs for im in j.images]), lambda out: _split(out, sizes)


@dataclass(frozen=True)
class ScorePairs:
    images: list[Any]
    texts: list[str]
    pairs: list[tuple[int, int]]  # (image index, text index) per pair

    def run(self, engine: Engine) -> PairScores:
        return engine.score_pairs(self.images, self.texts, self.pairs)

    @classmethod
    def merge(cls, jobs: Sequence[ScorePairs]) -> tuple[ScorePairs, Split]:
        images: list[Any] = []
        texts: list[str] = []
        pairs: list[tuple[int, int]] = []
        for j in jobs:
            pairs += [(i + len(images), t + len(texts)) for i, t in j.pairs]
            images += j.images
            texts += j.texts
        pair_sizes = [len(j.pairs) for j in jobs]
        text_sizes = [len(j.texts) for j in jobs]

        def split(scores: PairScores) -> list[PairScores]:
            return [
                PairScores(p, lg, c, n)
                for p, lg, c, n in zip(
                    _split(scores.itm_probability, pair_sizes),
                    _split(scores.itm_logits, pair_sizes),
                    _split(scores.itc_cosine, pair_sizes),
                    _split(scores.text_tokens, text_sizes),
                    strict=True,
                )
            ]

        # Identical images across jobs are encoded once: the engine dedups by content hash
        # within a call and keeps encoded images in its cache across calls.
        return cls(images, texts, pairs), split


@dataclass(frozen=True)
class Rank:
    """BLIP's two-stage ranking of one query's candidates (never merged: one query per call)."""

    query: Any
    candidates: list[Any]
    rerank_k: int | None
    image_query: bool  # an image ranks texts; otherwise a text ranks images

    def run(self, engine: Engine) -> Ranking:
        rank = engine.rank_texts if self.image_query else engine.rank_images
        return rank(self.query, self.candidates, top_k=None, rerank_k=self.rerank_k)


@dataclass(frozen=True)
class Explain:
    """Grad-CAM of a few captions of one image: a bounded piece of an explanation request (the
    server queues its captions piece by piece, so other requests run in between)."""

    image: Any
    texts: list[str]
    layer: int

    def run(self, engine: Engine) -> list[Explanation]:
        return engine.explain_batch(self.image, self.texts, layer=self.layer)


@dataclass(frozen=True)
class Caption:
    """Captions for images, with the captioner's settings (``Captioner.caption``'s keywords).
    Not merged with other requests' jobs: their settings and seeds differ, and a seeded sample
    must not depend on what else was in the batch."""

    images: list[Any]
    settings: dict[str, Any]

    def run(self, captioner: Captioner) -> list[CaptionResult]:
        return captioner.caption(self.images, **self.settings)


@dataclass(frozen=True)
class WarmUp:
    """One real forward pass (a grey image: one caption scored, or one token of a caption
    written), so the first request pays no start-up cost; the server is ready only once it has
    run."""

    caption: str = "a warm-up caption"

    def run(self, engine: Engine | Captioner) -> PairScores | list[CaptionResult]:
        grey = Image.new("RGB", (64, 64), (128, 128, 128))
        if engine.info.task == "caption":
            captioner = cast("Captioner", engine)
            return captioner.caption(grey, num_beams=1, max_length=len(captioner.prompt_ids()) + 1)
        return cast("Engine", engine).score(grey, self.caption)
