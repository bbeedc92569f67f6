"""The per-batch primitive: samples -> one score row per (sample, candidate caption).

The local runner and a Ray Data actor call the same :func:`score_batch`. It makes one
``engine.score_pairs`` call for the batch (each image encoded once, identical images by content
once, each image's cross-attention shared by its captions). Unusable captions are found by
tokenizing first; a sample whose image the engine refuses (corrupt, truncated or missing) gets a
status row and the rest of the batch is scored again without it: the images encoded before it
come from the engine's cache (``--cache-mb``), or are encoded again when the cache is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from blipitm.common.memory import release_free_memory
from blipitm.errors import InvalidInputError
from blipitm.filtering.readers import Sample
from blipitm.processing.text import clean_caption
from blipitm.scoring import blip_retrieval_score

if TYPE_CHECKING:
    from blipitm.engine import Engine

SCORE_COLUMNS = ("itm_probability", "itm_logit", "itc_cosine", "blip_score")


class By(StrEnum):
    """The scores a run can filter on (``--by``), each a column of :data:`SCORE_COLUMNS`."""

    ITM = "itm"  # the ITM match probability
    ITC = "itc"  # the ITC cosine
    BLIP = "blip"  # BLIP's retrieval score, match logit + cosine

    @property
    def column(self) -> str:
        return _COLUMN[self]

    @classmethod
    def parse(cls, value: By | str) -> By:
        """``value`` as a member; anything else is an error naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = sorted(b.value for b in cls)
            raise InvalidInputError(
                f"by must be one of {choices}, got {value!r}", loc=("by",)
            ) from None


_COLUMN = {By.ITM: "itm_probability", By.ITC: "itc_cosine", By.BLIP: "blip_score"}


def score_batch(engine: Engine, samples: Sequence[Sample]) -> dict[str, list[Any]]:
    """Score rows for ``samples``, in sample order then candidate order.

    Columns: ``sample`` (index into ``samples``), ``id``, ``candidate``, ``caption``,
    ``itm_probability``, ``itm_logit`` (the match logit), ``itc_cosine``, ``blip_score``
    (match logit + cosine, BLIP's retrieval score), ``status`` and ``error``. Rows without a
    score have NaN scores and a status other than ``ok``.
    """
    status = {i: (s.status, s.error) for i, s in enumerate(samples) if s.status != "ok"}
    bad_text = _bad_captions(engine, samples, status)
    while True:
        pairs = [
            (i, c)
            for i, s in enumerate(samples)
            if i not in status
            for c in range(len(s.captions))
            if (i, c) not in bad_text
        ]
        live = sorted({i for i, _ in pairs})  # a sample without a usable caption: no image
        try:
            scores = _score(engine, samples, live, pairs)
            break
        except InvalidInputError as e:
            status[live[refused_item(e, "images")]] = ("bad_image", str(e))
    rows = _rows(samples, status, bad_text, pairs, scores)
    release_free_memory()  # the batch's images and activations: keeps a long run's RSS flat
    return rows


def refused_item(e: InvalidInputError, field: str) -> int:
    """Which item of ``field`` (``"images"``, ``"texts"``) an engine call refused, so that the
    caller can mark it and call again without it; ``e`` itself when it is about anything else
    (an argument, the whole call)."""
    where, pos = (*e.loc, None, None)[:2]
    if where != field or not isinstance(pos, int):
        raise e
    return pos


def _bad_captions(
    engine: Engine, samples: Sequence[Sample], status: dict[int, tuple[str, str]]
) -> dict[tuple[int, int], tuple[str, str]]:
    """Unusable captions, found by tokenizing alone before any image is encoded (the engine
    checks texts after images, so finding them there would encode the images again)."""
    pairs = [
        (i, c) for i, s in enumerate(samples) if i not in status for c in range(len(s.captions))
    ]
    bad: dict[tuple[int, int], tuple[str, str]] = {}
    # "", "   " and (under BLIP's cleanup) "!!!" alike: nothing left to score.
    for i, c in pairs:
        if not clean_caption(samples[i].captions[c], engine.protocol).strip():
            bad[(i, c)] = ("bad_caption", "the caption is empty (after the protocol's cleanup)")
    while True:
        live = [p for p in pairs if p not in bad]
        try:
            engine.count_tokens([samples[i].captions[c] for i, c in live])
            return bad
        except InvalidInputError as e:
            bad[live[refused_item(e, "texts")]] = ("bad_caption", e.reason)


def _score(
    engine: Engine, samples: Sequence[Sample], live: list[int], pairs: list[tuple[int, int]]
) -> dict[str, np.ndarray]:
    if not pairs:
        return {name: np.zeros(0, np.float32) for name in SCORE_COLUMNS}
    slot = {i: k for k, i in enumerate(live)}
    images = [samples[i].image for i in live]
    texts = [samples[i].captions[c] for i, c in pairs]
    index = [(slot[i], t) for t, (i, _) in enumerate(pairs)]
    got = engine.score_pairs(images, texts, index)  # type: ignore[arg-type]
    logit = got.itm_logits[:, 1].astype(np.float32)
    return {
        "itm_probability": got.itm_probability.astype(np.float32),
        "itm_logit": logit,
        "itc_cosine": got.itc_cosine.astype(np.float32),
        "blip_score": blip_retrieval_score(logit, got.itc_cosine).astype(np.float32),
    }


def _rows(
    samples: Sequence[Sample],
    status: dict[int, tuple[str, str]],
    bad_text: dict[tuple[int, int], tuple[str, str]],
    pairs: list[tuple[int, int]],
    scores: dict[str, np.ndarray],
) -> dict[str, list[Any]]:
    row_of = {p: r for r, p in enumerate(pairs)}
    cols: dict[str, list[Any]] = {
        k: [] for k in ("sample", "id", "candidate", "caption", *SCORE_COLUMNS, "status", "error")
    }
    nan = float("nan")

    def add(i: int, c: int, caption: str | None, st: str, err: str, r: int | None) -> None:
        cols["sample"].append(i)
        cols["id"].append(samples[i].key)
        cols["candidate"].append(c)
        cols["caption"].append(caption)
        for name in SCORE_COLUMNS:
            cols[name].append(nan if r is None else float(scores[name][r]))
        cols["status"].append(st)
        cols["error"].append(err)

    for i, s in enumerate(samples):
        if i in status or not s.captions:
            st, err = status.get(i, ("no_caption", "no caption"))
            for c, caption in enumerate(s.captions or [None]):
                add(i, c, caption, st, err, None)
            continue
        for c, caption in enumerate(s.captions):
            if (i, c) in bad_text:
                add(i, c, caption, *bad_text[(i, c)], None)
            else:
                add(i, c, caption, "ok", "", row_of[(i, c)])
    return cols
