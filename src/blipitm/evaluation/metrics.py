"""Recall@K exactly as BLIP's ``train_retrieval.py`` ``itm_eval`` computes it, vectorised.

BLIP ranks a row with ``inds = np.argsort(score)[::-1]`` and takes the position of the ground
truth in ``inds``. Reading a stable ascending argsort backwards puts, among equal scores, the
*higher* index first, so the rank of column ``c`` in a row ``s`` is::

    #{j : s[j] > s[c]}  +  #{j > c : s[j] == s[c]}

which is what we compute, without sorting. (Which index wins a tie with NumPy's default
``argsort`` kind depends on the NumPy version and CPU, since NumPy 2 uses SIMD sorts that are
not stable; we pin the stable reading. Ties only occur in practice among the -100 fill values of
the protocol, i.e. when ``k_test`` is below 10.) An image's text-retrieval rank is the best rank
among its captions; an image with no captions never counts as found (BLIP's rank 1e20).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KS = (1, 5, 10)
# Elements compared per block, to bound memory on 5k x 25k COCO matrices.
_BLOCK_ELEMS = 1 << 24

IndexMap = Mapping[int, Any] | Sequence[Any] | np.ndarray


def positions(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """0-based position of ``scores[rows[p], cols[p]]`` in BLIP's ordering of row ``rows[p]``."""
    scores = np.asarray(scores)
    n = scores.shape[1]
    out = np.empty(len(rows), dtype=np.int64)
    col_index = np.arange(n)
    step = max(1, _BLOCK_ELEMS // max(n, 1))
    for a in range(0, len(rows), step):
        r, c = rows[a : a + step], cols[a : a + step]
        block = scores[r]  # [P, n]
        target = block[np.arange(len(r)), c][:, None]  # [P, 1]
        above = (block > target).sum(axis=1)
        tied_after = ((block == target) & (col_index[None, :] > c[:, None])).sum(axis=1)
        out[a : a + step] = above + tied_after
    return out


def retrieval_ranks(
    scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: IndexMap, img2txt: IndexMap
) -> tuple[np.ndarray, np.ndarray]:
    """(text-retrieval rank per image [I], image-retrieval rank per text [T]) as floats;
    ``inf`` for an image without captions."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(
            f"scores_t2i has shape {scores_t2i.shape}; expected {(n_txt, n_img)} "
            f"(the transpose of scores_i2t {scores_i2t.shape})"
        )
    rows: list[int] = []
    cols: list[int] = []
    for i in range(n_img):
        for t in img2txt[i]:
            rows.append(i)
            cols.append(int(t))
    r, c = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    txt_ranks = np.full(n_img, np.inf)
    if len(r):
        np.minimum.at(txt_ranks, r, positions(scores_i2t, r, c).astype(np.float64))
    gt = np.asarray([int(txt2img[t]) for t in range(n_txt)], dtype=np.int64)
    img_ranks = positions(scores_t2i, np.arange(n_txt), gt).astype(np.float64)
    return txt_ranks, img_ranks


def recall(ranks: np.ndarray, k: int) -> float:
    """``100 * mean(rank < k)`` written as BLIP does, so the float is bit-identical."""
    return 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks)


def itm_eval(
    scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: IndexMap, img2txt: IndexMap
) -> dict[str, float]:
    """BLIP's retrieval metrics: ``txt_r1/5/10`` (image -> text), ``img_r1/5/10`` (text ->
    image), their means and ``r_mean``, in percent.

    ``scores_i2t`` [I, T] and ``scores_t2i`` [T, I]; ``img2txt[i]`` lists the caption ids of
    image ``i`` and ``txt2img[t]`` is the image id of caption ``t`` (dicts or sequences).
    """
    txt_ranks, img_ranks = retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt)
    if len(txt_ranks) == 0 or len(img_ranks) == 0:
        raise ValueError("itm_eval needs at least one image and one text")
    tr1, tr5, tr10 = (recall(txt_ranks, k) for k in KS)
    ir1, ir5, ir10 = (recall(img_ranks, k) for k in KS)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K for K = 1..max_k (percent), for the report's plot."""
    return np.asarray([recall(ranks, k) for k in range(1, max_k + 1)])
