"""The engine: the one place where the model, preprocessing, device and dtype meet.

Work is organised around what it costs (DESIGN.md §2, cost model): an image is decoded and encoded
once and its tokens cached by content hash; its cross-attention keys/values are computed once per
call (and kept in the cache while it has room) and shared by every text scored against it; texts are
sorted by length into batches, which the model runs packed (no work on padding).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from PIL import Image

from blipitm.config import BlipConfig
from blipitm.engine.cache import ByteLRU
from blipitm.engine.devices import TORCH_DTYPES
from blipitm.engine.explain import explanations, gradcam
from blipitm.engine.options import DEFAULT_CACHE_BYTES, DEFAULT_MAX_TEXT_CHARS
from blipitm.engine.types import (
    NUMPY_DTYPES,
    BatchSizes,
    ImageFeatures,
    MatrixScores,
    ModelInfo,
    PairScores,
    Ranked,
    Ranking,
    TextFeatures,
)
from blipitm.errors import InvalidInputError, Loc
from blipitm.explain import Explanation, resolve_layer
from blipitm.model import BlipITM, CrossKV, DenseKV
from blipitm.processing.budget import PixelBudget
from blipitm.processing.image import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    ImageSettings,
    ResizedImage,
    content_key,
    load_resized,
    normalize,
)
from blipitm.processing.text import clean_caption, validate_text
from blipitm.processing.tokenizer import Tokenizer, pad
from blipitm.scoring import PROTOCOLS, itm_probability

log = logging.getLogger("blipitm")

T = TypeVar("T")


def default_batch_sizes(device: torch.device, compute_dtype: torch.dtype) -> BatchSizes:
    """CPU, base size. Texts: on a 2-core Xeon with AMX, 128 texts per batch against 32 gave
    bf16 text embeddings 279-296 vs 240-251 texts/s and ITM 1x128 204-221 vs 165-189 pairs/s
    (the text GEMMs grow from ~480 to ~1900 rows, where AMX runs nearer its peak). In float32
    the same machine was level (90-96 vs 84-90 texts/s) and the first machine, without native
    bf16, slower at 128 (ITM 1x128: 1.76/1.69/1.72/1.98 s at 16/32/64/128), so float32 keeps
    32. Image encoding is flat from 4 to 16 images per batch. GPU batches are sized to fill the
    device without tuning data here."""
    if device.type == "cuda":
        return BatchSizes(images=64, texts=256)
    return BatchSizes(images=8, texts=32 if compute_dtype == torch.float32 else 128)


@dataclass
class _EncodedImage:
    """One image as the engine holds it (and caches it, by ``key``) between calls."""

    tokens: torch.Tensor  # [T, Dv], compute dtype, on device
    embedding: torch.Tensor  # [E] float32, unit norm
    key: str | None = None  # content hash; None for features handed in by the caller


@dataclass(frozen=True)
class _Intake:
    """What a decode thread hands back for one image: model-sized pixels or cached features."""

    key: str  # content hash
    pixels: torch.Tensor | None  # [3, S, S] float32, normalised; None on a cache hit
    cached: tuple[torch.Tensor, torch.Tensor] | None  # (tokens, embedding) on a cache hit


class Engine:
    """Scores, embeds and ranks images against texts with one loaded BLIP ITM model."""

    def __init__(
        self,
        model: BlipITM,
        tokenizer: Tokenizer,
        image_settings: ImageSettings,
        info: ModelInfo,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        batch_sizes: BatchSizes | None = None,
        decode_threads: int | None = None,
        decode_budget_pixels: int | None = None,
    ) -> None:
        """``decode_budget_pixels``: full-size pixels the decode threads may hold at once (see
        :class:`PixelBudget`); default ``max_pixels``, i.e. one largest allowed image at a time or
        several smaller ones. No budget when both are None."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.info = info
        self.protocol = PROTOCOLS[info.protocol]
        self.device = torch.device(info.device)
        self.dtype: torch.dtype = next(model.parameters()).dtype  # weights
        self.compute_dtype = TORCH_DTYPES[info.compute_dtype]
        model.set_compute_dtype(self.compute_dtype)
        self.max_pixels = max_pixels
        self.max_text_chars = max_text_chars
        self.batch_sizes = batch_sizes or default_batch_sizes(self.device, self.compute_dtype)
        self.cache = ByteLRU(cache_bytes)
        self._decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(
            max_workers=self._decode_threads,
            thread_name_prefix="blipitm-decode",
        )
        budget = decode_budget_pixels if decode_budget_pixels is not None else max_pixels
        self.decode_budget = (
            None if budget is None else PixelBudget(budget, setting="decode_budget_pixels")
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def config(self) -> BlipConfig:
        return self.info.config

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        *,
        itc: bool = True,
    ) -> PairScores:
        """Score zipped (image, text) pairs; a single image or a single text broadcasts.

        ``itc=False`` skips the unimodal text pass (about 40% of the work for short captions)
        when only the ITM outputs are wanted; ``itc_cosine`` is then NaN.
        """
        image_list, single_image = _as_list(images, _is_single_image)
        text_list, single_text = _as_list(texts, lambda t: isinstance(t, str))
        if single_image:
            image_list = image_list * len(text_list)
        if single_text:
            text_list = text_list * len(image_list)
        if len(image_list) != len(text_list):
            raise InvalidInputError(
                f"got {len(image_list)} images and {len(text_list)} texts; pass equally many "
                "(they are zipped into pairs), or a single image or text to broadcast",
                loc=("texts",),
            )
        n = len(text_list)
        if n == 0:
            return PairScores(_empty(0), _empty(0, 2), _empty(0), _token_counts([]))
        # Broadcast inputs are decoded once: unique images by position before broadcasting.
        uniq_images = image_list[:1] if single_image else image_list
        feats = self._image_features(uniq_images, loc=("images",))
        image_of_pair = [0] * n if single_image else list(range(n))
        uniq_texts = text_list[:1] if single_text else text_list
        text_of_pair = [0] * n if single_text else list(range(n))
        ids = self._token_ids(uniq_texts, ("texts",))  # once, for both passes
        logits = self._itm_pairs(feats, ids, image_of_pair, text_of_pair)
        cosine = self._pair_cosine(feats, ids, image_of_pair, text_of_pair, itc)
        return PairScores(itm_probability(logits), logits, cosine, _token_counts(ids))

    def score_matrix(
        self, images: Sequence[ImageInput], texts: Sequence[str], *, itc: bool = True
    ) -> MatrixScores:
        """Score every image against every text: fields ``[I, T]`` and logits ``[I, T, 2]``.

        ``itc=False``: ITM only, ``itc_cosine`` is NaN.
        """
        image_list, _ = _as_list(images, _is_single_image)
        text_list, _ = _as_list(texts, lambda t: isinstance(t, str))
        feats = self._image_features(image_list, loc=("images",))
        ids = self._token_ids(text_list, ("texts",))
        i, t = len(image_list), len(text_list)
        if i == 0 or t == 0:
            return MatrixScores(_empty(i, t), _empty(i, t, 2), _empty(i, t), _token_counts(ids))
        pairs_img = [g for g in range(i) for _ in range(t)]
        pairs_txt = [k for _ in range(i) for k in range(t)]
        logits = self._itm_pairs(feats, ids, pairs_img, pairs_txt).reshape(i, t, 2)
        if itc:
            cosine = self._image_embeddings(feats) @ self._text_embeddings(ids).T
        else:
            cosine = np.full((i, t), np.nan, dtype=np.float32)
        return MatrixScores(
            itm_probability(logits), logits, cosine.astype(np.float32), _token_counts(ids)
        )

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Unit-norm ITC image embeddings ``[N, E]`` float32."""
        image_list, _ = _as_list(images, _is_single_image)
        if not image_list:
            return _empty(0, self.embedding_dim)
        return self._image_embeddings(self._image_features(image_list, loc=("images",)))

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit-norm ITC text embeddings ``[N, E]`` float32."""
        return self.encode_texts(texts).embeddings

    def encode_texts(self, texts: str | Sequence[str]) -> TextFeatures:
        """:meth:`embed_texts` with the tokens the model read for each text (as
        :meth:`count_tokens`, from the same tokenization)."""
        text_list, _ = _as_list(texts, lambda t: isinstance(t, str))
        if not text_list:
            return TextFeatures(_empty(0, self.embedding_dim), _token_counts([]))
        ids = self._token_ids(text_list, ("texts",))
        return TextFeatures(self._text_embeddings(ids), _token_counts(ids))

    def rank_texts(
        self,
        image: ImageInput,
        texts: Sequence[str],
        *,
        top_k: int | None = None,
        rerank_k: int | None = 128,
    ) -> Ranking:
        """Rank ``texts`` for one ``image`` (a ``str`` is a path, as in :meth:`score`), best first.

        The ``rerank_k`` texts with the highest ITC cosine are scored with ITM; the rest are not
        returned. Score: the protocol's :meth:`~blipitm.scoring.ScoringProtocol.rank_score`,
        ``itm_logits[1] + itc_cosine`` under ``blip`` (BLIP's retrieval evaluation) and the ITM
        probability under ``transformers``. ``Ranked.index`` points into ``texts``;
        ``text_tokens`` counts the tokens of all ``texts``, ranked or not.
        """
        _check_rank_ks(top_k, rerank_k)
        _reject_single(texts, lambda t: isinstance(t, str), ("texts",), "rank_texts(image, [text])")
        text_list = list(texts)
        if not text_list:
            return Ranking(text_tokens=0)
        feats = self._image_features([image], loc=("image",))
        ids = self._token_ids(text_list, ("texts",))
        cosine = self._text_embeddings(ids) @ feats[0].embedding.numpy()  # [T]
        keep = _top_indices(cosine, rerank_k)
        logits = self._itm_pairs(feats, ids, [0] * len(keep), keep.tolist())
        return self._ranked(keep, logits, cosine[keep], top_k, ids)

    def rank_images(
        self,
        text: str,
        images: Sequence[ImageInput],
        *,
        top_k: int | None = None,
        rerank_k: int | None = 128,
    ) -> Ranking:
        """Rank ``images`` for one ``text``, best first; as :meth:`rank_texts` the other way.

        ``Ranked.index`` points into ``images``; ``text_tokens`` counts ``text``'s tokens.
        """
        _check_rank_ks(top_k, rerank_k)
        _reject_single(images, _is_single_image, ("images",), "rank_images(text, [image])")
        image_list = list(images)
        if not image_list:
            return Ranking(text_tokens=0)
        validate_text(text, loc=("text",), max_chars=self.max_text_chars)
        ids = self._token_ids([text], ("text",))
        feats = self._image_features(image_list, loc=("images",))
        cosine = self._image_embeddings(feats) @ self._text_embeddings(ids)[0]
        keep = _top_indices(cosine, rerank_k)
        logits = self._itm_pairs(feats, ids, keep.tolist(), [0] * len(keep))
        return self._ranked(keep, logits, cosine[keep], top_k, ids)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model reads for each text under this protocol (with ``[CLS]``/``[SEP]``;
        BLIP: after ``pre_caption`` and the 35-token truncation). Every result carries these
        counts already (``text_tokens``); this is for texts that are not scored."""
        return _token_counts(self._token_ids(texts, ("texts",))).tolist()

    def encode_images(self, images: Sequence[ImageInput]) -> ImageFeatures:
        """Encode images once, for :meth:`score_pairs` or to store (e.g. in an index).

        The tokens are in the compute dtype (``info.compute_dtype``), so nothing is lost."""
        image_list, _ = _as_list(images, _is_single_image)
        feats = self._image_features(image_list, loc=("images",))
        if not feats:
            shape = (0, self.info.image_tokens, self.config.vision.hidden_size)
            empty = np.zeros(shape, NUMPY_DTYPES[self.info.compute_dtype])
            return ImageFeatures(empty, _empty(0, self.embedding_dim))
        tokens = torch.stack([f.tokens for f in feats]).cpu()  # [N, T, Dv]
        if tokens.dtype == torch.bfloat16:  # numpy has no bfloat16: its raw bits
            tokens = tokens.view(torch.int16)
            return ImageFeatures(tokens.numpy().view(np.uint16), self._image_embeddings(feats))
        return ImageFeatures(tokens.numpy(), self._image_embeddings(feats))

    def score_pairs(
        self,
        images: Sequence[ImageInput] | ImageFeatures,
        texts: Sequence[str],
        pairs: Sequence[tuple[int, int]] | np.ndarray,
        *,
        itc: bool = True,
    ) -> PairScores:
        """Score ``(images[i], texts[t])`` for each ``(i, t)`` in ``pairs``.

        The primitive behind retrieval and evaluation: each image is encoded once, each text
        tokenized once, and each image's cross-attention keys/values shared by all its pairs.
        ``images`` may be :class:`ImageFeatures` from :meth:`encode_images`, in any of its dtypes.
        """
        idx = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if isinstance(images, ImageFeatures):
            feats = _from_features(images)
        else:
            feats = self._image_features(list(images), loc=("images",))
        text_list = list(texts)
        for col, (name, n) in enumerate((("images", len(feats)), ("texts", len(text_list)))):
            bad = np.flatnonzero((idx[:, col] < 0) | (idx[:, col] >= n))
            if bad.size:
                raise InvalidInputError(
                    f"pair {int(bad[0])} refers to {name}[{int(idx[bad[0], col])}], "
                    f"but there are {n} {name}",
                    loc=("pairs",),
                )
        ids = self._token_ids(text_list, ("texts",))
        if idx.shape[0] == 0:
            return PairScores(_empty(0), _empty(0, 2), _empty(0), _token_counts(ids))
        image_of_pair, text_of_pair = idx[:, 0].tolist(), idx[:, 1].tolist()
        logits = self._itm_pairs(feats, ids, image_of_pair, text_of_pair)
        cosine = self._pair_cosine(feats, ids, image_of_pair, text_of_pair, itc)
        return PairScores(itm_probability(logits), logits, cosine, _token_counts(ids))

    def explain(self, image: ImageInput, text: str, *, layer: int | None = None) -> Explanation:
        """Where ``text`` matches ``image``: LAVIS's Grad-CAM of the ITM match on text-encoder
        ``layer`` (0-based; default 6 as LAVIS, or the second to last layer of a shallower
        model), with the pair's scores. See :mod:`blipitm.engine.explain`."""
        if not isinstance(text, str):
            raise InvalidInputError(
                f"expected one text (a str), got {type(text).__name__}; for several captions "
                "use explain_batch(image, texts)",
                loc=("text",),
            )
        return self.explain_batch(image, [text], layer=layer)[0]

    def explain_batch(
        self, image: ImageInput, texts: Sequence[str], *, layer: int | None = None
    ) -> list[Explanation]:
        """:meth:`explain` for several captions of one image, batched (the same maps as one at a
        time)."""
        _reject_single(texts, lambda t: isinstance(t, str), ("texts",), "explain_batch(image, [t])")
        text_list = list(texts)
        layer = resolve_layer(layer, self.config.text.num_hidden_layers)
        resized = self._resized(image, ("image",))  # the maps are drawn over it
        ids = self._token_ids(text_list, ("texts",))
        feats = self._image_features([resized], loc=("image",))
        if not ids:
            return []
        cosine = self._text_embeddings(ids) @ feats[0].embedding.numpy()  # [N]
        kv = cast(DenseKV, self._cross_kv(feats))  # one image: its own stacked keys/values
        first = self.protocol.itm_first_token
        grid = self.config.vision.image_size // self.config.vision.patch_size
        out: list[Explanation] = []
        for rows in _chunks(range(len(ids)), self.batch_sizes.texts):
            input_ids, mask = pad([[first, *ids[r][1:]] for r in rows])
            logits, cams = gradcam(
                self.model, input_ids.to(self.device), mask.to(self.device), kv, layer
            )
            out += explanations(
                [text_list[r] for r in rows],
                [ids[r] for r in rows],
                [self.tokenizer.id_to_token(ids[r][1:-1]) for r in rows],
                logits.cpu().numpy(),
                cams.cpu().numpy(),
                cosine[rows],
                grid=grid,
                layer=layer,
                image=resized.pixels,
            )
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ranked(
        self,
        keep: np.ndarray,
        logits: np.ndarray,
        cosine: np.ndarray,
        top_k: int | None,
        ids: Sequence[Sequence[int]],
    ) -> Ranking:
        """The kept candidates ordered by the protocol's ranking score (ties: better ITC first),
        with the tokens of the texts ``ids`` the ranking read."""
        prob = itm_probability(logits)
        score = self.protocol.rank_score(logits, cosine)
        order = np.argsort(-score, kind="stable")[:top_k]
        return Ranking(
            (
                Ranked(int(keep[j]), float(score[j]), float(prob[j]), float(cosine[j]))
                for j in order
            ),
            text_tokens=int(_token_counts(ids).sum()),
        )

    # -- images -----------------------------------------------------------------------------

    def _decode(self, item: ImageInput, loc: Loc) -> torch.Tensor:
        """Model input ``[3, S, S]`` float32; the full-size image is gone when this returns."""
        pixels = load_resized(
            item,
            self.image_settings,
            self.protocol,
            loc=loc,
            max_pixels=self.max_pixels,
            budget=self.decode_budget,
        )
        return torch.from_numpy(normalize(pixels, self.image_settings))

    def _resized(self, item: ImageInput, loc: Loc) -> ResizedImage:
        """``item`` decoded and resized once; the engine encodes it (cached by the source's content
        key) without decoding it again."""
        if isinstance(item, ResizedImage):
            item.checked(self.image_settings, self.protocol, loc=loc)
            return item
        if not _is_single_image(item):
            raise InvalidInputError(
                "expected one image (PIL.Image, path, encoded bytes or HxWx3 uint8 array), "
                f"got {type(item).__name__}",
                loc=loc,
            )
        return ResizedImage.load(
            _read_if_path(item, loc),
            self.image_settings,
            self.protocol,
            loc=loc,
            max_pixels=self.max_pixels,
            budget=self.decode_budget,
        )

    def _intake(self, item: ImageInput, loc: Loc) -> _Intake:
        """On a decode thread: read (a path), hash, look up the cache, else decode one image.

        Files are read here, one per thread, not all up front, so a long list of paths costs no
        more memory than a short one.
        """
        source = _read_if_path(item, loc)
        if isinstance(source, ResizedImage):  # before the cache, which knows only its source
            source.checked(self.image_settings, self.protocol, loc=loc)
        key = content_key(source)
        cached = self.cache.get(("img", key))
        if cached is not None:
            return _Intake(key, None, cached)
        return _Intake(key, self._decode(source, loc), None)

    def _image_features(self, images: Sequence[ImageInput], *, loc: Loc) -> list[_EncodedImage]:
        """Features of each image, from the cache or encoded in batches.

        Decode threads work a bounded window ahead of the encoder and hand back model-sized
        pixels only; a batch is encoded as soon as it is full. Duplicates are encoded once. A
        bad item fails the call naming its location (images encoded before it stay cached, so
        a retry without it is cheap).
        """
        for i, item in enumerate(images):
            if not _is_single_image(item):
                raise InvalidInputError(
                    "expected an image (PIL.Image, path, encoded bytes or HxWx3 uint8 array), "
                    f"got {type(item).__name__}",
                    loc=(*loc, i),
                )
        out: list[_EncodedImage | None] = [None] * len(images)
        ready: dict[str, _EncodedImage] = {}  # this call's features by content key
        waiting: dict[str, list[int]] = {}  # content key -> positions, for the batch being filled
        batch: list[tuple[str, torch.Tensor]] = []

        def encode_batch() -> None:
            pixels = torch.stack([px for _, px in batch]).to(self.device, self.compute_dtype)
            with torch.inference_mode():
                tokens = self.model.encode_image(pixels)  # [B, N, Dv]
                emb = self.model.image_embedding(tokens).float().cpu()  # [B, E]
            for j, (key, _) in enumerate(batch):
                feat = _EncodedImage(tokens[j].clone(), emb[j].clone(), key)
                for pos in waiting.pop(key):
                    out[pos] = feat
                ready[key] = feat
                self.cache.put(("img", key), (feat.tokens, feat.embedding))
            batch.clear()

        intake = self._prefetch(lambda i: self._intake(images[i], (*loc, i)), range(len(images)))
        for i, got in enumerate(intake):
            if got.key in ready:
                out[i] = ready[got.key]
            elif got.key in waiting:
                waiting[got.key].append(i)
            elif got.cached is not None:
                out[i] = ready[got.key] = _EncodedImage(*got.cached, got.key)
            else:
                assert got.pixels is not None
                waiting[got.key] = [i]
                batch.append((got.key, got.pixels))
                if len(batch) == self.batch_sizes.images:
                    encode_batch()
        if batch:
            encode_batch()
        return [f for f in out if f is not None]

    def _prefetch(self, fn: Callable[[int], T], items: Sequence[int]) -> Iterator[T]:
        """``map(fn, items)`` on the decode pool, a bounded window ahead of the consumer.

        Decoding the next batch overlaps with encoding this one; the window keeps memory
        bounded for long lists. An error surfaces when its item is reached.
        """
        window = max(2 * self.batch_sizes.images, 2 * self._decode_threads)
        pending: deque[Future[T]] = deque()
        it = iter(items)
        try:
            for item in itertools.islice(it, window):
                pending.append(self._pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(it, 1):
                    pending.append(self._pool.submit(fn, item))
                yield result
        finally:
            for f in pending:
                f.cancel()

    def _image_embeddings(self, feats: Sequence[_EncodedImage]) -> np.ndarray:
        return torch.stack([f.embedding for f in feats]).numpy()

    def _cross_kv(self, feats: Sequence[_EncodedImage]) -> CrossKV:
        """Stacked cross-attention keys/values ``[G, h, N, d]`` per layer for ``feats``.

        Each image's K/V is cached under its content key while the cache has room, so an image
        scored again (another call, another request) skips the projection, about 70% of an ITM
        pass for a short caption.
        """
        per_image: list[DenseKV | None] = [
            self.cache.get(("kv", f.key)) if f.key is not None else None for f in feats
        ]
        missing = [g for g, kv in enumerate(per_image) if kv is None]
        if missing:
            tokens = torch.stack([feats[g].tokens for g in missing])
            with torch.inference_mode():
                fresh = self.model.cross_kv(tokens.to(self.device, self.compute_dtype))
            if len(missing) == len(feats):
                self._cache_kv(feats, fresh)
                return fresh
            for j, g in enumerate(missing):
                per_image[g] = [(k[j : j + 1], v[j : j + 1]) for k, v in fresh]
            self._cache_kv([feats[g] for g in missing], fresh)
        kvs = [kv for kv in per_image if kv is not None]
        if len(kvs) == 1:
            return kvs[0]
        # Per-image tensors, not concatenated: the model attends image by image (cheaper than
        # copying ~40 MB of K/V per base-size image into a batch).
        per_layer: CrossKV = [
            ([kv[i][0] for kv in kvs], [kv[i][1] for kv in kvs]) for i in range(len(kvs[0]))
        ]
        return per_layer

    def _cache_kv(self, feats: Sequence[_EncodedImage], kv: DenseKV) -> None:
        if self.cache.max_bytes == 0:
            return
        if len(feats) == 1:  # the tensors are this image's alone: no copy needed
            if feats[0].key is not None:
                self.cache.put(("kv", feats[0].key), list(kv))
            return
        for j, f in enumerate(feats):
            if f.key is not None:  # own copies: a slice would pin the whole batch's storage
                self.cache.put(
                    ("kv", f.key), _one_block([(k[j : j + 1], v[j : j + 1]) for k, v in kv])
                )

    # -- texts ------------------------------------------------------------------------------

    def _token_ids(self, texts: Sequence[Any], loc: Loc) -> list[list[int]]:
        """Validated, cleaned and tokenized (per protocol) texts with ``[CLS]`` first."""
        clean = [
            clean_caption(
                validate_text(t, loc=(*loc, i), max_chars=self.max_text_chars),
                self.protocol,
            )
            for i, t in enumerate(texts)
        ]
        ids = self.tokenizer.encode(clean, max_length=self.protocol.max_text_tokens)
        limit = self.config.text.max_position_embeddings
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise InvalidInputError(
                    f"text is {len(row)} tokens; the model accepts at most {limit}. Shorten it, "
                    "or use protocol='blip', which truncates to 35 tokens as BLIP does",
                    loc=(*loc, i),
                )
        return ids

    def _text_embeddings(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit-norm ITC embeddings ``[N, E]`` of tokenized texts (from :meth:`_token_ids`)."""
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        for rows in _length_batches(ids, self.batch_sizes.texts):
            input_ids, mask = pad([ids[r] for r in rows])
            with torch.inference_mode():
                emb = self.model.text_embedding(input_ids.to(self.device), mask.to(self.device))
            out[rows] = emb.float().cpu().numpy()
        return out

    def _pair_cosine(
        self,
        feats: Sequence[_EncodedImage],
        ids: Sequence[Sequence[int]],
        image_of_pair: Sequence[int],
        text_of_pair: Sequence[int],
        itc: bool = True,
    ) -> np.ndarray:
        if not itc:
            return np.full(len(image_of_pair), np.nan, dtype=np.float32)
        img = self._image_embeddings(feats)[list(image_of_pair)]
        txt = self._text_embeddings(ids)[list(text_of_pair)]
        return np.einsum("ne,ne->n", img, txt).astype(np.float32)

    # -- ITM --------------------------------------------------------------------------------

    def _itm_pairs(
        self,
        feats: Sequence[_EncodedImage],
        ids: Sequence[Sequence[int]],
        image_of_pair: Sequence[int],
        text_of_pair: Sequence[int],
    ) -> np.ndarray:
        """ITM logits ``[P, 2]`` float32; pair p is feats[image_of_pair[p]], ids[text_of_pair[p]].

        Images with several texts run one image at a time with its texts as the query block
        (keys/values computed once); images with one text are stacked into image batches.
        """
        first = self.protocol.itm_first_token
        ids = [[first, *row[1:]] for row in ids]  # the ITM pass's first token
        out = np.empty((len(image_of_pair), 2), dtype=np.float32)
        by_image: dict[int, list[int]] = {}
        for p, g in enumerate(image_of_pair):
            by_image.setdefault(g, []).append(p)
        singles = [ps[0] for ps in by_image.values() if len(ps) == 1]
        for g, ps in by_image.items():
            if len(ps) == 1:
                continue
            kv = self._cross_kv([feats[g]])
            for rows in _length_batches([ids[text_of_pair[p]] for p in ps], self.batch_sizes.texts):
                pairs = [ps[r] for r in rows]
                out[pairs] = self._itm_forward([ids[text_of_pair[p]] for p in pairs], kv)
        for rows in _length_batches(
            [ids[text_of_pair[p]] for p in singles], self.batch_sizes.images
        ):
            pairs = [singles[r] for r in rows]
            kv = self._cross_kv([feats[image_of_pair[p]] for p in pairs])
            out[pairs] = self._itm_forward([ids[text_of_pair[p]] for p in pairs], kv)
        return out

    def _itm_forward(self, rows: Sequence[Sequence[int]], kv: CrossKV) -> np.ndarray:
        input_ids, mask = pad(rows)
        with torch.inference_mode():
            logits = self.model.itm_logits(input_ids.to(self.device), mask.to(self.device), kv)
        return logits.float().cpu().numpy()


# -- helpers ----------------------------------------------------------------------------------


def _one_block(kv: DenseKV) -> DenseKV:
    """A copy of one image's K/V in a single allocation, handed out as per-layer views.

    A cache entry as 2 x layers separate tensors fragments the heap as entries are evicted
    and replaced, and a long run's resident size creeps up well past the cache's budget; one
    block per entry is freed and reused whole.
    """
    block = torch.stack([torch.stack(pair) for pair in kv])  # [L, 2, 1, h, N, d]
    return [(block[i, 0], block[i, 1]) for i in range(block.shape[0])]


def _is_single_image(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim in (2, 3)
    return isinstance(
        x, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, ResizedImage)
    )


def _as_list(x: Any, is_single: Callable[[Any], bool]) -> tuple[list[Any], bool]:
    if is_single(x):
        return [x], True
    if isinstance(x, (list, tuple)):
        return list(x), False
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x), False
    raise InvalidInputError(f"expected one item or a list of items, got {type(x).__name__}")


def _read_if_path(item: Any, loc: Loc) -> Any:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            return path.read_bytes()
        except IsADirectoryError:
            raise InvalidInputError(f"{path} is a directory, not an image file", loc=loc) from None
        except OSError as e:
            raise InvalidInputError(
                f"cannot read image file {path}: {e.strerror or e}", loc=loc
            ) from None
    return item


def _check_rank_ks(top_k: int | None, rerank_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise InvalidInputError(f"must be >= 1 or None, got {top_k}", loc=("top_k",))
    if rerank_k is not None and rerank_k < 1:
        raise InvalidInputError(f"must be >= 1 or None, got {rerank_k}", loc=("rerank_k",))


def _reject_single(candidates: Any, is_single: Callable[[Any], bool], loc: Loc, hint: str) -> None:
    # A lone str (or image) would otherwise be iterated character by character (or row by row).
    if is_single(candidates):
        raise InvalidInputError(
            f"expected a list of candidates, got a single {type(candidates).__name__}; "
            f"wrap it in a list: {hint}",
            loc=loc,
        )


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _length_batches(ids: Sequence[Sequence[int]], size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (longest first), so padding stays tight."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    yield from _chunks(order, size)


def _top_indices(scores: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    return order if k is None else order[:k]


def _from_features(features: ImageFeatures) -> list[_EncodedImage]:
    """A caller's features as the engine's own (on the CPU; moved to the device per batch)."""
    tokens = torch.from_numpy(features.tokens)  # shares the memory
    if features.token_dtype == "bfloat16":
        tokens = tokens.view(torch.int16).view(torch.bfloat16)
    return [
        _EncodedImage(tokens[i], torch.from_numpy(features.embeddings[i]), None)
        for i in range(len(features))
    ]


def _token_counts(ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Tokens per text ``[N]`` int64, from :meth:`Engine._token_ids` (the ids the model reads)."""
    return np.array([len(row) for row in ids], dtype=np.int64)


def _empty(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)
