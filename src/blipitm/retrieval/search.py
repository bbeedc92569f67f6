"""Two-stage search over an index: exact ITC top-k, then ITM rerank with the BLIP score.

Stage 1 scans every live row of the memory-mapped embeddings in chunks (one matmul per chunk,
bounded memory, exact; a million 256-d rows is ~1 GB read once per query). Stage 2 scores the
best ``rerank_k`` with the ITM head through ``Engine.score_pairs``; the score is the protocol's
(:meth:`~blipitm.scoring.ScoringProtocol.rank_score`: ``itm_logits[:, 1] + itc_cosine`` under
``blip``, BLIP's ``train_retrieval.py`` ``evaluation``, and the ITM probability under
``transformers``), exactly as ``Engine.rank_texts`` / ``Engine.rank_images``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from blipitm.common.safeio import UnreadableFileError
from blipitm.common.topk import merge_top_k, top_k_indices
from blipitm.engine.types import ImageFeatures, PairScores
from blipitm.errors import InvalidInputError
from blipitm.retrieval.errors import IndexDamagedError, IndexMismatchError
from blipitm.retrieval.ingest import read_image_file
from blipitm.retrieval.store import Index, Item, Kind

if TYPE_CHECKING:  # torch: not for the CLI's checks before a model loads
    from blipitm.engine import Engine
    from blipitm.processing.image import ImageInput

SCAN_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class SearchHit:
    """One result. ``itm_probability`` / ``itm_logit`` are None when ``rerank_k=0``."""

    id: int
    kind: Kind
    path: str | None  # image items: folder name + path inside it, or the JSONL's relative path
    text: str | None  # text items
    metadata: dict[str, Any]
    score: float  # what the hits are sorted by (see module docstring)
    itc_cosine: float
    itm_probability: float | None
    itm_logit: float | None  # itm_logits[1], the positive-class logit
    file: str | None = None  # image items: absolute path on this machine; not in as_dict()

    def as_dict(self) -> dict[str, Any]:
        """What the CLI's --json and the server show: no absolute path of this machine."""
        return {
            "id": self.id,
            "kind": self.kind,
            "path": self.path,
            "text": self.text,
            "metadata": self.metadata,
            "score": self.score,
            "itc_cosine": self.itc_cosine,
            "itm_probability": self.itm_probability,
            "itm_logit": self.itm_logit,
        }


class SearchHits(list[SearchHit]):
    """What :func:`search` returns: the hits best first, as a plain list, and ``text_tokens``,
    the tokens the model read for a text query (0 for an image query)."""

    def __init__(self, hits: Iterable[SearchHit] = (), *, text_tokens: int) -> None:
        super().__init__(hits)
        self.text_tokens = text_tokens


def search(
    engine: Engine,
    index: Index,
    query: str | ImageInput,
    *,
    top_k: int = 10,
    rerank_k: int = 128,
) -> SearchHits:
    """Search ``index`` for the items of the other modality that best match ``query``.

    A ``str`` query is a caption and finds images; anything else is an image (PIL, bytes, array,
    or a path as ``pathlib.Path``) and finds captions. The ``rerank_k`` best items by ITC cosine
    are rescored with ITM (BLIP score) and the best ``top_k`` of them returned, best first;
    ``rerank_k=0`` returns the ITC top ``top_k`` without ITM. The index must have been built with
    this engine's model (checked when the index is opened with an engine; call
    ``Index.open(path, engine)``). Raises InvalidInputError for a bad query or arguments.
    """
    if top_k < 1:
        raise InvalidInputError(f"must be >= 1, got {top_k}", loc=("top_k",))
    if rerank_k < 0:
        raise InvalidInputError(f"must be >= 0, got {rerank_k}", loc=("rerank_k",))
    if index.dim != engine.embedding_dim:  # Index.open(path, engine) refuses this already
        raise IndexMismatchError(
            f"index {index.path} has {index.dim}-d embeddings, the model {engine.embedding_dim}-d"
        )
    text_query = isinstance(query, str)
    target: Kind = "image" if text_query else "text"
    problem = modality_problem(index, text_query=text_query)
    if problem is not None:
        raise InvalidInputError(problem, loc=("query",))
    query_feats: ImageFeatures | None = None
    text_tokens = 0
    if isinstance(query, str):
        encoded = engine.encode_texts([query])
        q, text_tokens = encoded.embeddings[0], int(encoded.text_tokens[0])
    else:
        query_feats = engine.encode_images([query])  # field "images[0]" on a bad image
        q = query_feats.embeddings[0]
    first_k = rerank_k if rerank_k > 0 else top_k
    rows, cosine = scan_top_k(index, q, first_k, target)
    if rows.size == 0:
        return SearchHits(text_tokens=text_tokens)
    items = index.items_at_rows(rows.tolist())
    if rerank_k == 0:
        return SearchHits(
            (_hit(it, float(c), float(c), None, None) for it, c in zip(items, cosine, strict=True)),
            text_tokens=text_tokens,
        )
    if text_query:
        scores = _rerank_images(engine, index, str(query), items, rows)
    else:
        assert query_feats is not None
        texts = [str(it.text) for it in items]
        scores = engine.score_pairs(
            query_feats, texts, [(0, j) for j in range(len(items))], itc=False
        )
    logits, prob = scores.itm_logits, scores.itm_probability
    score = engine.protocol.rank_score(logits, cosine)
    if not np.isfinite(score).all():
        bad = items[int(np.flatnonzero(~np.isfinite(score))[0])]
        raise IndexDamagedError(
            f"index {index.path}: item {bad.id} scores NaN or inf (are its stored features "
            f"damaged?); check it with 'blipitm index verify {index.path}'"
        )
    order = np.argsort(-score, kind="stable")[:top_k]  # ties: better ITC first, as Engine.rank_*
    return SearchHits(
        (
            _hit(items[j], float(score[j]), float(cosine[j]), float(prob[j]), float(logits[j, 1]))
            for j in order
        ),
        text_tokens=text_tokens,
    )


def modality_problem(index: Index, *, text_query: bool) -> str | None:
    """Why ``index`` cannot answer a text (``text_query``) or an image query, or None.

    A caption finds images and an image finds captions, so an index without live items of the
    other modality has nothing to return: say that, instead of an empty list. No paths of this
    machine in the message (the server sends it to clients)."""
    target: Kind = "image" if text_query else "text"
    if index.live_mask(target).any():
        return None
    other: Kind = "text" if text_query else "image"
    held = int(index.live_mask(other).sum())
    if held == 0:
        return "the index holds no items (all were removed, or none was added)"
    has = f"it holds {held} {'caption' if other == 'text' else 'image'}{'' if held == 1 else 's'}"
    if text_query:
        return (
            f"the index holds no images ({has}): a caption query searches images; "
            "search its captions with an image query"
        )
    return (
        f"the index holds no captions ({has}): an image query searches captions; "
        "search its images with a caption"
    )


def scan_top_k(
    index: Index, query_embedding: np.ndarray, k: int, kind: Kind
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` live rows of ``kind`` by cosine, best first (ties: lower row first)."""
    emb = index.embeddings()
    live = index.live_mask(kind)
    q = np.asarray(query_embedding, dtype=np.float32)
    best_rows = np.zeros(0, dtype=np.int64)
    best = np.zeros(0, dtype=np.float32)
    for a in range(0, emb.shape[0], SCAN_CHUNK_ROWS):
        b = min(a + SCAN_CHUNK_ROWS, emb.shape[0])
        keep = np.flatnonzero(live[a:b])
        if keep.size == 0:
            continue
        sims = (np.asarray(emb[a:b]) @ q)[keep]  # [n_live_in_chunk]
        if not np.isfinite(sims).all():  # the file changed under an open index
            row = a + int(keep[np.flatnonzero(~np.isfinite(sims))[0]])
            raise IndexDamagedError(
                f"index {index.path}: the embedding at row {row} is NaN or inf; check it with "
                f"'blipitm index verify {index.path}'"
            )
        top = top_k_indices(sims[None, :], k)[0]
        best_rows, best = merge_top_k(best_rows, best, (keep[top] + a), sims[top], k)
    return best_rows, best


def _rerank_images(
    engine: Engine, index: Index, query: str, items: list[Item], rows: np.ndarray
) -> PairScores:
    pairs = [(j, 0) for j in range(len(items))]
    if index.has_features:
        # Stored half-precision tokens: no image is decoded or re-encoded.
        frows = [int(it.feature_row) for it in items if it.feature_row is not None]
        if len(frows) == len(items):
            feats = ImageFeatures(index.features(frows), np.asarray(index.embeddings()[rows]))
            return engine.score_pairs(feats, [query], pairs, itc=False)
    try:
        # Regular files under the cap only: an indexed path replaced by a FIFO or a symlink to
        # /dev/zero must not hang or exhaust a search.
        images = [read_image_file(str(it.path)) for it in items]
    except (UnreadableFileError, OSError) as e:
        reason = str(e) if isinstance(e, UnreadableFileError) else (e.strerror or str(e))
        raise IndexDamagedError(
            f"index {index.path}: an indexed image can no longer be read ({reason}); restore "
            f"it, or remove it with 'blipitm index remove {index.path} PATH'"
        ) from e
    try:
        return engine.score_pairs(images, [query], pairs, itc=False)
    except InvalidInputError as e:
        # The client's query is fine: the index points at a file that changed or went away.
        raise IndexDamagedError(
            f"index {index.path}: an indexed image can no longer be read ({e.reason}); restore "
            f"it, or remove it with 'blipitm index remove {index.path} PATH'"
        ) from e


def _hit(
    item: Item, score: float, cosine: float, prob: float | None, logit: float | None
) -> SearchHit:
    return SearchHit(
        item.id,
        item.kind,
        item.relpath,
        item.text,
        item.metadata,
        score,
        cosine,
        prob,
        logit,
        file=item.path,
    )
