"""Deterministic exact top-k, for matrices (evaluation) and for chunked scans (search).

``np.argpartition`` picks arbitrarily among values tied at the k-th place; we pick the lowest
indices among ties instead, and order the result by (score descending, index ascending), so the
same inputs always give the same candidates on every platform.
"""

from __future__ import annotations

import numpy as np


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores`` [R, N], the indices of the ``min(k, N)`` highest, best first."""
    if scores.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {scores.shape}")
    rows, n = scores.shape
    k = min(k, n)
    if k <= 0 or rows == 0:
        return np.zeros((rows, max(k, 0)), dtype=np.int64)
    neg = -scores
    if k == n:
        return np.argsort(neg, axis=1, kind="stable")
    part = np.argpartition(neg, k - 1, axis=1)
    threshold = np.take_along_axis(neg, part[:, k - 1 : k], axis=1)  # [R, 1]: k-th best
    better = neg < threshold
    tied = neg == threshold
    need = k - better.sum(axis=1, keepdims=True)
    chosen = better | (tied & (np.cumsum(tied, axis=1) <= need))  # exactly k per row
    idx = np.nonzero(chosen)[1].reshape(rows, k)  # ascending index within each row
    order = np.argsort(np.take_along_axis(neg, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def top_k_mask(scores: np.ndarray, k: int, *, row_chunk_elems: int = 1 << 24) -> np.ndarray:
    """Boolean [R, N] mask of each row's ``top_k_indices``, computed in row chunks."""
    rows, n = scores.shape
    mask = np.zeros((rows, n), dtype=bool)
    step = max(1, row_chunk_elems // max(n, 1))
    for a in range(0, rows, step):
        block = np.ascontiguousarray(scores[a : a + step])
        idx = top_k_indices(block, k)
        np.put_along_axis(mask[a : a + step], idx, True, axis=1)
    return mask


def merge_top_k(
    rows_a: np.ndarray, scores_a: np.ndarray, rows_b: np.ndarray, scores_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of two candidate lists by (score desc, row asc); used by chunked scans."""
    rows = np.concatenate([rows_a, rows_b])
    scores = np.concatenate([scores_a, scores_b])
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]
