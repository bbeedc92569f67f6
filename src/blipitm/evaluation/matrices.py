"""The score matrices of BLIP's retrieval evaluation (``train_retrieval.py`` ``evaluation``).

1. ITC: ``sims = image_emb @ text_emb.T`` [I, T].
2. Each image keeps its ``k_test`` best texts by ``sims`` (i2t) and each text its ``k_test``
   best images (t2i); k is capped at the gallery size (BLIP's ``topk`` would fail instead).
3. A kept pair scores ``itm_logits[:, 1] + sims``
   (:func:`~blipitm.scoring.blip_retrieval_score`; the ITM pass starts with the protocol's first
   token, ``[ENC]`` under blip); everything else is -100.

BLIP runs the ITM pass for I*k + T*k pairs. A pair kept by both directions has the same logit,
so we score the *union* of the two sets once, grouped by image so that each image's
cross-attention keys/values are computed once per chunk (``Engine.score_pairs``). Chunks are
cut at image boundaries, persisted as they finish (see ``workdir.py``) and reported through
``progress``. Texts go to the engine raw: it cleans and truncates them as its protocol says
(under blip: BLIP's ``pre_caption``, 30 words, and 35 tokens).

Top-k ties (never seen with real float scores) are broken towards the lower index; BLIP leaves
them to ``torch.topk``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blipitm.common.identity import mismatch, model_record
from blipitm.common.progress import Progress, no_progress
from blipitm.common.topk import top_k_mask
from blipitm.engine import ImageFeatures
from blipitm.engine.types import NUMPY_DTYPES
from blipitm.errors import InvalidInputError
from blipitm.evaluation.workdir import WorkDir
from blipitm.processing.image import ImageInput, content_key
from blipitm.scoring import blip_retrieval_score

if TYPE_CHECKING:
    from blipitm.engine import Engine  # torch: for annotations only

DEFAULT_K_TEST = 128  # configs/retrieval_flickr.yaml (COCO uses 256)
DEFAULT_CHUNK_PAIRS = 8192
TEXT_BATCH = 256
FILL = -100.0  # BLIP's torch.full(..., -100.0)


@dataclass(frozen=True)
class EvalScores:
    """Everything one evaluation computes; ``scores_*`` are what ``itm_eval`` consumes."""

    scores_i2t: np.ndarray  # [I, T] float32
    scores_t2i: np.ndarray  # [T, I] float32
    sims: np.ndarray  # [I, T] float32 ITC cosine (for the ITC-only recalls)
    k_i2t: int
    k_t2i: int
    pairs_protocol: int  # ITM passes BLIP's loop runs: I*k_i2t + T*k_t2i
    pairs_scored: int  # the union we actually score
    seconds: dict[str, float]  # images, texts, itm: summed over resumed runs
    itm_pairs_timed: int  # pairs whose time is in seconds["itm"]
    pairs_this_run: int
    resumed: bool

    @property
    def pairs_per_second(self) -> float:
        t = self.seconds.get("itm", 0.0)
        return self.itm_pairs_timed / t if t > 0 else float("nan")


def score_matrices(
    engine: Engine,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    *,
    k_test: int = DEFAULT_K_TEST,
    progress: Progress = no_progress,
    work_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BLIP's ``(scores_i2t [I, T], scores_t2i [T, I])`` for ``images`` vs ``texts``.

    ``progress(stage, done, total)`` is called per committed batch (stages ``images``,
    ``texts``, ``itm``). With ``work_dir`` every finished batch is persisted there and a rerun
    with the same inputs resumes; see :func:`compute_scores` for the details.
    """
    out = compute_scores(engine, images, texts, k_test=k_test, progress=progress, work_dir=work_dir)
    return out.scores_i2t, out.scores_t2i


def compute_scores(
    engine: Engine,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    *,
    k_test: int = DEFAULT_K_TEST,
    progress: Progress = no_progress,
    work_dir: str | os.PathLike[str] | None = None,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    image_batch: int | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> EvalScores:
    """:func:`score_matrices` with its by-products (ITC sims, pair counts, timings).

    ``fingerprint`` adds caller facts (e.g. the annotation file's hash) to what decides whether
    ``work_dir`` holds a resumable run of the same inputs.
    """
    if k_test < 1:
        raise InvalidInputError(f"must be >= 1, got {k_test}", loc=("k_test",))
    if chunk_pairs < 1:
        raise InvalidInputError(f"must be >= 1, got {chunk_pairs}", loc=("chunk_pairs",))
    n_img, n_txt = len(images), len(texts)
    if n_img == 0 or n_txt == 0:
        raise InvalidInputError(f"need images and texts, got {n_img} and {n_txt}")
    fp = {
        "images": _images_digest(images),
        "texts": _digest(json.dumps(list(texts), ensure_ascii=False).encode()),
        "k_test": k_test,
        "chunk_pairs": chunk_pairs,
        "model_info": engine.info.as_dict(),
        "model": model_record(engine),
        **(fingerprint or {}),
    }
    work = WorkDir(
        None if work_dir is None else Path(work_dir),
        fp,
        same_model=lambda recorded: mismatch(recorded, engine) is None,
    )
    clock = _Clock(work)
    pairs_before = clock.itm_pairs

    img_emb, tokens = _encode_images(engine, images, work, clock, progress, image_batch)
    txt_emb = _embed_texts(engine, texts, work, clock, progress)

    sims = img_emb @ txt_emb.T  # [I, T] float32, as BLIP's image_embeds @ text_embeds.t()
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    keep_i2t = top_k_mask(sims, k_i2t)  # [I, T]
    keep_t2i = top_k_mask(sims.T, k_t2i)  # [T, I]
    union = keep_i2t | keep_t2i.T
    pairs = np.argwhere(union)  # [P, 2] (image, text), image-major: one image's pairs together
    itm = _score_pairs(engine, texts, pairs, tokens, img_emb, work, clock, progress, chunk_pairs)

    # float32 + float32, as BLIP's score + topk_sim
    score = blip_retrieval_score(itm, sims[pairs[:, 0], pairs[:, 1]])
    scores_i2t = np.full((n_img, n_txt), FILL, dtype=np.float32)
    scores_t2i = np.full((n_txt, n_img), FILL, dtype=np.float32)
    sel = keep_i2t[pairs[:, 0], pairs[:, 1]]
    scores_i2t[pairs[sel, 0], pairs[sel, 1]] = score[sel]
    sel = keep_t2i[pairs[:, 1], pairs[:, 0]]
    scores_t2i[pairs[sel, 1], pairs[sel, 0]] = score[sel]
    return EvalScores(
        scores_i2t=scores_i2t,
        scores_t2i=scores_t2i,
        sims=sims,
        k_i2t=k_i2t,
        k_t2i=k_t2i,
        pairs_protocol=n_img * k_i2t + n_txt * k_t2i,
        pairs_scored=len(pairs),
        seconds=dict(clock.seconds),
        itm_pairs_timed=clock.itm_pairs,
        pairs_this_run=clock.itm_pairs - pairs_before,
        resumed=work.resumed,
    )


# -- stages ---------------------------------------------------------------------------------


def _encode_images(
    engine: Engine,
    images: Sequence[ImageInput],
    work: WorkDir,
    clock: _Clock,
    progress: Progress,
    batch: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings [I, E] and vision tokens [I, T, Dv] in the engine's compute dtype.

    Tokens are kept so the ITM stage never re-encodes an image; in a work dir they are a memory
    map, so RAM stays bounded (Flickr30k test: 1000 x 577 x 768 fp32 = 1.8 GB on disk). They come
    back from the engine in its compute dtype, the dtype its K/V projections read, so storing
    them as they are is exact (see :class:`ImageFeatures` for how bfloat16 is held)."""
    shape = (engine.info.image_tokens, engine.config.vision.hidden_size)
    store_dtype = NUMPY_DTYPES[engine.info.compute_dtype]
    tokens = work.rows("image_tokens", len(images), shape, store_dtype)
    emb = work.rows("image_emb", len(images), (engine.embedding_dim,), np.float32)
    tokens.done = emb.done = min(tokens.done, emb.done)  # a kill between the two commits
    size = batch or engine.batch_sizes.images
    progress("images", emb.done, len(images))
    for a in range(emb.done, len(images), size):
        t0 = time.perf_counter()
        feats = engine.encode_images(list(images[a : a + size]))
        tokens.commit(feats.tokens)
        emb.commit(feats.embeddings)
        clock.add("images", time.perf_counter() - t0)
        progress("images", emb.done, len(images))
    return np.asarray(emb.array), tokens.array


def _embed_texts(
    engine: Engine, texts: Sequence[str], work: WorkDir, clock: _Clock, progress: Progress
) -> np.ndarray:
    emb = work.rows("text_emb", len(texts), (engine.embedding_dim,), np.float32)
    progress("texts", emb.done, len(texts))
    for a in range(emb.done, len(texts), TEXT_BATCH):
        t0 = time.perf_counter()
        emb.commit(engine.embed_texts(list(texts[a : a + TEXT_BATCH])))
        clock.add("texts", time.perf_counter() - t0)
        progress("texts", emb.done, len(texts))
    return np.asarray(emb.array)


def _score_pairs(
    engine: Engine,
    texts: Sequence[str],
    pairs: np.ndarray,
    tokens: np.ndarray,
    img_emb: np.ndarray,
    work: WorkDir,
    clock: _Clock,
    progress: Progress,
    chunk_pairs: int,
) -> np.ndarray:
    """``itm_logits[:, 1]`` of every pair, chunk by chunk (cut at image boundaries)."""
    out = np.empty(len(pairs), dtype=np.float32)
    plan = _digest(pairs.tobytes())[:16]  # chunk files are only valid for this exact pair set
    done = 0
    progress("itm", 0, len(pairs))
    for a, b, pa, pb in _chunks(pairs, chunk_pairs):
        key = f"{plan}-{a:07d}-{b:07d}"
        got = work.load_chunk(key, pb - pa)
        if got is None:
            t0 = time.perf_counter()
            local = pairs[pa:pb]
            # Only this chunk's texts go to the engine (it tokenizes all it is given); the cosine
            # comes from the stored embeddings, so the engine's ITC pass is skipped.
            uniq, inverse = np.unique(local[:, 1], return_inverse=True)
            feats = ImageFeatures(np.asarray(tokens[a:b]), np.asarray(img_emb[a:b]))
            result = engine.score_pairs(
                feats,
                [texts[t] for t in uniq],
                np.stack([local[:, 0] - a, inverse], axis=1),
                itc=False,
            )
            got = result.itm_logits[:, 1].astype(np.float32)
            work.save_chunk(key, got)
            clock.add("itm", time.perf_counter() - t0, pairs=pb - pa)
        out[pa:pb] = got
        done += pb - pa
        progress("itm", done, len(pairs))
    return out


def _chunks(pairs: np.ndarray, target: int) -> list[tuple[int, int, int, int]]:
    """(first image, end image, first pair, end pair) per chunk, about ``target`` pairs each and
    never splitting an image's pairs (its keys/values are then computed once)."""
    if len(pairs) == 0:
        return []
    n_img = int(pairs[:, 0].max()) + 1
    starts = np.searchsorted(pairs[:, 0], np.arange(n_img + 1))  # pair offset of each image
    out = []
    a = 0
    while a < n_img:
        b = a + 1
        while b < n_img and starts[b + 1] - starts[a] <= target:
            b += 1
        out.append((a, b, int(starts[a]), int(starts[b])))
        a = b
    return out


# -- helpers --------------------------------------------------------------------------------


class _Clock:
    """Stage seconds summed over resumed runs (kept in the work dir), for throughput numbers."""

    def __init__(self, work: WorkDir) -> None:
        self._work = work
        saved = work.load_json("timings.json") or {}
        self.seconds: dict[str, float] = {
            k: float(saved.get(k, 0.0)) for k in ("images", "texts", "itm")
        }
        self.itm_pairs = int(saved.get("itm_pairs", 0))

    def add(self, stage: str, seconds: float, *, pairs: int = 0) -> None:
        self.seconds[stage] += seconds
        self.itm_pairs += pairs
        self._work.save_json("timings.json", {**self.seconds, "itm_pairs": self.itm_pairs})


def _images_digest(images: Sequence[ImageInput]) -> str:
    """Identity of the images: path, size and mtime for files, content for in-memory images."""
    h = hashlib.sha256()
    for img in images:
        if isinstance(img, str | os.PathLike):
            path = Path(img)
            try:
                st = path.stat()
                h.update(f"path:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"missing:{path}\n".encode())
        else:  # in memory: by content, hashed without copying a large image whole
            h.update(f"content:{content_key(img)}\n".encode())
    return h.hexdigest()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
