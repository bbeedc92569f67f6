"""The engine: the public API, a facade over the one place where model, preprocessing, device and
dtype meet.

Work is organised around what it costs (docs/architecture.md, cost model); each part has its own
module: :mod:`~blipitm.engine.images` decodes and encodes each image once and caches its features
by content key; :mod:`~blipitm.engine.itm` computes an image's cross-attention keys/values once
per call (cached while the cache has room) and shares them with every text scored against it;
:mod:`~blipitm.engine.texts` tokenizes and embeds texts in length-sorted, packed batches;
:mod:`~blipitm.engine.gradcam` explains a match. This module checks the arguments
(:mod:`~blipitm.engine.inputs`), calls those parts and builds the result records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from blipitm.config import BlipConfig
from blipitm.engine.cache import ByteLRU
from blipitm.engine.devices import TORCH_DTYPES, default_batch_sizes
from blipitm.engine.gradcam import explanations, gradcam
from blipitm.engine.images import EncodedImage, ImagePipeline, from_features, to_features
from blipitm.engine.images import embeddings as image_embeddings
from blipitm.engine.inputs import (
    as_list,
    check_rank_ks,
    is_image,
    is_text,
    reject_single,
)
from blipitm.engine.itm import ITMScorer
from blipitm.engine.options import DEFAULT_CACHE_BYTES, DEFAULT_MAX_TEXT_CHARS
from blipitm.engine.texts import TextEncoder, chunks, token_counts
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
from blipitm.model import BlipITM, DenseKV
from blipitm.processing.budget import PixelBudget
from blipitm.processing.image import DEFAULT_MAX_PIXELS, ImageInput, ImageSettings, ResizedImage
from blipitm.processing.text import validate_text
from blipitm.processing.tokenizer import Tokenizer, pad
from blipitm.scoring import ScoringProtocol, itm_probability


class Engine:
    """Scores, embeds and ranks images against texts with one loaded BLIP ITM model.

    Built by :func:`blipitm.load`. Its parts are public for the code that builds on them (the
    captioner reuses :attr:`images`): ``images`` (:class:`ImagePipeline`), ``texts``
    (:class:`TextEncoder`) and ``itm`` (:class:`ITMScorer`). They share :attr:`cache`, one
    byte-bounded LRU whose entries are keyed ``("img", content key)`` (vision tokens and
    embedding) and ``("kv", content key)`` (cross-attention keys/values); its ``stats`` count
    hits, misses and evictions.
    """

    def __init__(
        self,
        model: BlipITM,
        tokenizer: Tokenizer,
        image_settings: ImageSettings,
        info: ModelInfo,
        protocol: ScoringProtocol,
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
        if protocol.name != info.protocol:
            raise ValueError(f"protocol {protocol.name!r}, but the model is {info.protocol!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.info = info
        self.protocol = protocol
        self.device = torch.device(info.device)
        self.dtype: torch.dtype = next(model.parameters()).dtype  # weights
        self.compute_dtype = TORCH_DTYPES[info.compute_dtype]
        model.set_compute_dtype(self.compute_dtype)
        self.max_pixels = max_pixels
        self.max_text_chars = max_text_chars
        self.batch_sizes = batch_sizes or default_batch_sizes(self.device, self.compute_dtype)
        self.cache = ByteLRU(cache_bytes)
        self.images = ImagePipeline(
            model,
            image_settings,
            protocol,
            self.cache,
            device=self.device,
            compute_dtype=self.compute_dtype,
            batch_size=self.batch_sizes.images,
            max_pixels=max_pixels,
            decode_threads=decode_threads,
            decode_budget_pixels=decode_budget_pixels,
        )
        self.texts = TextEncoder(
            model,
            tokenizer,
            protocol,
            info.config,
            device=self.device,
            batch_size=self.batch_sizes.texts,
            max_chars=max_text_chars,
        )
        self.itm = ITMScorer(
            model,
            protocol,
            self.cache,
            device=self.device,
            compute_dtype=self.compute_dtype,
            image_batch=self.batch_sizes.images,
            text_batch=self.batch_sizes.texts,
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def config(self) -> BlipConfig:
        return self.info.config

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    @property
    def decode_budget(self) -> PixelBudget | None:
        """The full-size pixels image decoding may hold at once (None: unbounded)."""
        return self.images.budget

    def prepare_image(self, image: ImageInput, loc: Loc = ("image",)) -> ResizedImage:
        """Decode and resize one image now (encoded bytes, a path, a PIL image or an array),
        under this engine's pixel limit and decode budget; every method taking images accepts
        the result and encodes it without decoding again (it shares the source's cache entry).

        For a front end that decodes as requests arrive, so that a bad image fails its own
        request before any batch is formed; errors name ``loc``."""
        return self.images.prepare(image, loc)

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
        image_list, single_image = as_list(images, is_image)
        text_list, single_text = as_list(texts, is_text)
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
            return PairScores(_empty(0), _empty(0, 2), _empty(0), token_counts([]))
        # Broadcast inputs are decoded once: unique images by position before broadcasting.
        uniq_images = image_list[:1] if single_image else image_list
        feats = self.images.features(uniq_images, loc=("images",))
        image_of_pair = [0] * n if single_image else list(range(n))
        uniq_texts = text_list[:1] if single_text else text_list
        text_of_pair = [0] * n if single_text else list(range(n))
        ids = self.texts.token_ids(uniq_texts, ("texts",))  # once, for both passes
        logits = self.itm.logits(feats, ids, image_of_pair, text_of_pair)
        cosine = self._pair_cosine(feats, ids, image_of_pair, text_of_pair, itc)
        return PairScores(itm_probability(logits), logits, cosine, token_counts(ids))

    def score_matrix(
        self, images: Sequence[ImageInput], texts: Sequence[str], *, itc: bool = True
    ) -> MatrixScores:
        """Score every image against every text: fields ``[I, T]`` and logits ``[I, T, 2]``.

        ``itc=False``: ITM only, ``itc_cosine`` is NaN.
        """
        image_list, _ = as_list(images, is_image)
        text_list, _ = as_list(texts, is_text)
        feats = self.images.features(image_list, loc=("images",))
        ids = self.texts.token_ids(text_list, ("texts",))
        i, t = len(image_list), len(text_list)
        if i == 0 or t == 0:
            return MatrixScores(_empty(i, t), _empty(i, t, 2), _empty(i, t), token_counts(ids))
        pairs_img = [g for g in range(i) for _ in range(t)]
        pairs_txt = [k for _ in range(i) for k in range(t)]
        logits = self.itm.logits(feats, ids, pairs_img, pairs_txt).reshape(i, t, 2)
        if itc:
            cosine = image_embeddings(feats) @ self.texts.embeddings(ids).T
        else:
            cosine = np.full((i, t), np.nan, dtype=np.float32)
        return MatrixScores(
            itm_probability(logits), logits, cosine.astype(np.float32), token_counts(ids)
        )

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Unit-norm ITC image embeddings ``[N, E]`` float32."""
        image_list, _ = as_list(images, is_image)
        if not image_list:
            return _empty(0, self.embedding_dim)
        return image_embeddings(self.images.features(image_list, loc=("images",)))

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit-norm ITC text embeddings ``[N, E]`` float32."""
        return self.encode_texts(texts).embeddings

    def encode_texts(self, texts: str | Sequence[str]) -> TextFeatures:
        """:meth:`embed_texts` with the tokens the model read for each text (as
        :meth:`count_tokens`, from the same tokenization)."""
        text_list, _ = as_list(texts, is_text)
        if not text_list:
            return TextFeatures(_empty(0, self.embedding_dim), token_counts([]))
        ids = self.texts.token_ids(text_list, ("texts",))
        return TextFeatures(self.texts.embeddings(ids), token_counts(ids))

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
        check_rank_ks(top_k, rerank_k)
        reject_single(texts, is_text, ("texts",), "rank_texts(image, [text])")
        text_list = list(texts)
        if not text_list:
            return Ranking(text_tokens=0)
        feats = self.images.features([image], loc=("image",))
        ids = self.texts.token_ids(text_list, ("texts",))
        cosine = self.texts.embeddings(ids) @ feats[0].embedding.numpy()  # [T]
        keep = _top_indices(cosine, rerank_k)
        logits = self.itm.logits(feats, ids, [0] * len(keep), keep.tolist())
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
        check_rank_ks(top_k, rerank_k)
        reject_single(images, is_image, ("images",), "rank_images(text, [image])")
        image_list = list(images)
        if not image_list:
            return Ranking(text_tokens=0)
        validate_text(text, loc=("text",), max_chars=self.max_text_chars)
        ids = self.texts.token_ids([text], ("text",))
        feats = self.images.features(image_list, loc=("images",))
        cosine = image_embeddings(feats) @ self.texts.embeddings(ids)[0]
        keep = _top_indices(cosine, rerank_k)
        logits = self.itm.logits(feats, ids, keep.tolist(), [0] * len(keep))
        return self._ranked(keep, logits, cosine[keep], top_k, ids)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model reads for each text under this protocol (with ``[CLS]``/``[SEP]``;
        BLIP: after ``pre_caption`` and the 35-token truncation). Every result carries these
        counts already (``text_tokens``); this is for texts that are not scored."""
        return token_counts(self.texts.token_ids(texts, ("texts",))).tolist()

    def encode_images(self, images: Sequence[ImageInput]) -> ImageFeatures:
        """Encode images once, for :meth:`score_pairs` or to store (e.g. in an index).

        The tokens are in the compute dtype (``info.compute_dtype``), so nothing is lost."""
        image_list, _ = as_list(images, is_image)
        feats = self.images.features(image_list, loc=("images",))
        if not feats:
            shape = (0, self.info.image_tokens, self.config.vision.hidden_size)
            empty = np.zeros(shape, NUMPY_DTYPES[self.info.compute_dtype])
            return ImageFeatures(empty, _empty(0, self.embedding_dim))
        return to_features(feats)

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
            feats = from_features(images)
        else:
            feats = self.images.features(list(images), loc=("images",))
        text_list = list(texts)
        for col, (name, n) in enumerate((("images", len(feats)), ("texts", len(text_list)))):
            bad = np.flatnonzero((idx[:, col] < 0) | (idx[:, col] >= n))
            if bad.size:
                raise InvalidInputError(
                    f"pair {int(bad[0])} refers to {name}[{int(idx[bad[0], col])}], "
                    f"but there are {n} {name}",
                    loc=("pairs",),
                )
        ids = self.texts.token_ids(text_list, ("texts",))
        if idx.shape[0] == 0:
            return PairScores(_empty(0), _empty(0, 2), _empty(0), token_counts(ids))
        image_of_pair, text_of_pair = idx[:, 0].tolist(), idx[:, 1].tolist()
        logits = self.itm.logits(feats, ids, image_of_pair, text_of_pair)
        cosine = self._pair_cosine(feats, ids, image_of_pair, text_of_pair, itc)
        return PairScores(itm_probability(logits), logits, cosine, token_counts(ids))

    def explain(self, image: ImageInput, text: str, *, layer: int | None = None) -> Explanation:
        """Where ``text`` matches ``image``: LAVIS's Grad-CAM of the ITM match on text-encoder
        ``layer`` (0-based; default 6 as LAVIS, or the second to last layer of a shallower
        model), with the pair's scores. See :mod:`blipitm.engine.gradcam`."""
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
        reject_single(texts, is_text, ("texts",), "explain_batch(image, [t])")
        text_list = list(texts)
        layer = resolve_layer(layer, self.config.text.num_hidden_layers)
        resized = self.images.prepare(image, ("image",))  # the maps are drawn over it
        ids = self.texts.token_ids(text_list, ("texts",))
        feats = self.images.features([resized], loc=("image",))
        if not ids:
            return []
        cosine = self.texts.embeddings(ids) @ feats[0].embedding.numpy()  # [N]
        kv = cast(DenseKV, self.itm.cross_kv(feats))  # one image: its own stacked keys/values
        first = self.protocol.itm_first_token
        grid = self.config.vision.image_size // self.config.vision.patch_size
        out: list[Explanation] = []
        for rows in chunks(range(len(ids)), self.batch_sizes.texts):
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
        self.images.close()

    def _pair_cosine(
        self,
        feats: Sequence[EncodedImage],
        ids: Sequence[Sequence[int]],
        image_of_pair: Sequence[int],
        text_of_pair: Sequence[int],
        itc: bool = True,
    ) -> np.ndarray:
        if not itc:
            return np.full(len(image_of_pair), np.nan, dtype=np.float32)
        img = image_embeddings(feats)[list(image_of_pair)]
        txt = self.texts.embeddings(ids)[list(text_of_pair)]
        return np.einsum("ne,ne->n", img, txt).astype(np.float32)

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
            text_tokens=int(token_counts(ids).sum()),
        )


def _top_indices(scores: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    return order if k is None else order[:k]


def _empty(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)
