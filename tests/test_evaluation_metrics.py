"""itm_eval: BLIP's recall semantics, by hand-worked cases and against a literal transcription of
BLIP's train_retrieval.py loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from blipitm.common.topk import top_k_indices
from blipitm.evaluation import itm_eval, retrieval_ranks


def blip_itm_eval(scores_i2t: Any, scores_t2i: Any, txt2img: Any, img2txt: Any, kind: str) -> dict:
    """BLIP's itm_eval, line for line, with the argsort kind made explicit."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind=kind)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind=kind)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
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


def test_ties_and_several_captions_by_hand() -> None:
    img2txt = {0: [0, 1], 1: [2, 3]}
    txt2img = {0: 0, 1: 0, 2: 1, 3: 1}
    i2t = np.array(
        [
            # descending, ties higher index first: t2, t1, t0, t3 -> its captions at 2 and 1 -> 1
            [0.5, 0.9, 0.9, 0.1],
            # all tied: t3, t2, t1, t0 -> caption t3 at 0
            [0.3, 0.3, 0.3, 0.3],
        ]
    )
    t2i = np.array(
        [
            [0.2, 0.2],  # tie: i1 before i0 -> gt i0 at 1
            [0.7, 0.1],  # gt i0 at 0
            [0.4, 0.4],  # tie: i1 first -> gt i1 at 0
            [0.9, 0.8],  # gt i1 at 1
        ]
    )
    txt_ranks, img_ranks = retrieval_ranks(i2t, t2i, txt2img, img2txt)
    assert txt_ranks.tolist() == [1, 0]
    assert img_ranks.tolist() == [1, 0, 0, 1]
    got = itm_eval(i2t, t2i, txt2img, img2txt)
    assert got == {
        "txt_r1": 50.0,
        "txt_r5": 100.0,
        "txt_r10": 100.0,
        "txt_r_mean": (50.0 + 100.0 + 100.0) / 3,
        "img_r1": 50.0,
        "img_r5": 100.0,
        "img_r10": 100.0,
        "img_r_mean": (50.0 + 100.0 + 100.0) / 3,
        "r_mean": ((50.0 + 100.0 + 100.0) / 3 + (50.0 + 100.0 + 100.0) / 3) / 2,
    }
    # the same with list mappings
    assert itm_eval(i2t, t2i, [0, 0, 1, 1], [[0, 1], [2, 3]]) == got


def _row_with_rank(n: int, gt: int, rank: int) -> np.ndarray:
    """A row where column gt sits at exactly ``rank``: ``rank`` columns above it, the rest below."""
    row = np.full(n, -1.0)
    row[gt] = 0.0
    others = [j for j in range(n) if j != gt]
    row[others[:rank]] = 1.0 + np.arange(rank)
    return row


def test_k_boundaries_by_hand() -> None:
    n = 12  # 12 images, one caption each (caption t belongs to image t)
    i2t_ranks = [0, 4, 5, 9, 10, 11, 0, 1, 2, 3, 6, 7]
    t2i_ranks = [10, 9, 5, 4, 0, 0, 0, 11, 11, 11, 11, 11]
    i2t = np.stack([_row_with_rank(n, i, r) for i, r in enumerate(i2t_ranks)])
    t2i = np.stack([_row_with_rank(n, t, r) for t, r in enumerate(t2i_ranks)])
    ident = list(range(n))
    got = itm_eval(i2t, t2i, ident, [[i] for i in ident])
    assert got["txt_r1"] == 100.0 * 2 / 12  # ranks 0, 0
    assert got["txt_r5"] == 100.0 * 6 / 12  # 0, 4, 0, 1, 2, 3 (not 5)
    assert got["txt_r10"] == 100.0 * 10 / 12  # all but 10, 11 (9 counts)
    assert got["img_r1"] == 100.0 * 3 / 12
    assert got["img_r5"] == 100.0 * 4 / 12  # 4, 0, 0, 0
    assert got["img_r10"] == 100.0 * 6 / 12  # 9, 5, 4, 0, 0, 0 (not 10)
    assert got["r_mean"] == (got["txt_r_mean"] + got["img_r_mean"]) / 2


def test_best_caption_wins_and_captionless_image_misses() -> None:
    # descending: t0 t1 t3 t5 t6 t7 t8 t2 t4 t9 -> image 0's captions t5 (rank 3), t2 (rank 7)
    row = np.array([9, 8, 3.5, 7, 1, 6.5, 6, 5, 4, 0])
    i2t = np.stack([row, np.zeros(10)])
    t2i = np.zeros((10, 2))
    t2i[:, 0] = 1.0
    img2txt = {0: [2, 5], 1: []}  # image 1 has no captions: BLIP's rank stays 1e20
    txt2img = {t: 0 for t in range(10)}
    txt_ranks, img_ranks = retrieval_ranks(i2t, t2i, txt2img, img2txt)
    assert txt_ranks[0] == 3 and np.isinf(txt_ranks[1])
    assert img_ranks.tolist() == [0] * 10
    got = itm_eval(i2t, t2i, txt2img, img2txt)
    assert (got["txt_r1"], got["txt_r5"], got["txt_r10"]) == (0.0, 50.0, 50.0)
    assert got == blip_itm_eval(i2t, t2i, txt2img, img2txt, "stable")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_blip_loop_on_random_matrices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img, per = 40, 5
    n_txt = n_img * per
    txt2img = {t: t // per for t in range(n_txt)}
    img2txt = {i: list(range(i * per, (i + 1) * per)) for i in range(n_img)}
    # continuous scores: no ties, so any argsort kind is BLIP's
    i2t = rng.standard_normal((n_img, n_txt)).astype(np.float32)
    t2i = rng.standard_normal((n_txt, n_img)).astype(np.float32)
    assert itm_eval(i2t, t2i, txt2img, img2txt) == blip_itm_eval(
        i2t, t2i, txt2img, img2txt, "quicksort"
    )
    # protocol-shaped: top-3 kept, -100 elsewhere (heavy ties), plus rounded scores (more ties)
    for m in (i2t, t2i):
        keep = np.zeros(m.shape, dtype=bool)
        np.put_along_axis(keep, top_k_indices(m, 3), True, axis=1)
        m[~keep] = -100.0
        m[keep] = np.round(m[keep], 1)
    assert itm_eval(i2t, t2i, txt2img, img2txt) == blip_itm_eval(
        i2t, t2i, txt2img, img2txt, "stable"
    )


def test_flickr_sized_matrix_matches_blip_loop() -> None:
    # 1000 x 5000 like the Karpathy Flickr30k test, protocol-shaped (-100 outside the top 16)
    rng = np.random.default_rng(3)
    n_img, per = 1000, 5
    n_txt = n_img * per
    sims = rng.standard_normal((n_img, n_txt)).astype(np.float32)
    i2t = np.full_like(sims, -100.0)
    idx = top_k_indices(sims, 16)
    np.put_along_axis(i2t, idx, np.take_along_axis(sims, idx, axis=1), axis=1)
    t2i = np.full_like(sims.T, -100.0)
    idx = top_k_indices(np.ascontiguousarray(sims.T), 16)
    np.put_along_axis(t2i, idx, np.take_along_axis(sims.T, idx, axis=1), axis=1)
    txt2img = [t // per for t in range(n_txt)]
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    got = itm_eval(i2t, t2i, txt2img, img2txt)
    assert got == blip_itm_eval(i2t, t2i, txt2img, img2txt, "stable")


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="transpose"):
        itm_eval(np.zeros((2, 3)), np.zeros((2, 3)), [0, 0, 1], [[0, 1], [2]])
