"""The server's batching with the real engine: what a request gets back does not depend on which
other requests shared its batch, and requests are served in the order they came.

Since the text encoder runs packed (no padding rows), the server needs no length bucketing across
requests: a short text batched with long ones costs and returns what it would alone. Reference:
each request run alone through the engine (fp32; measured differences ~1e-7, tolerance 5e-6).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.engine import TextFeatures
from blipitm.server.batching import Batcher, EmbedTexts, ScorePairs
from blipitm.server.metrics import Metrics

TOL = 5e-6
TEXTS = [
    ["a dog"],
    ["two people walking near a red car on a long wet street at night", "a cat"],
    ["the sky"],
    ["a small child holding a blue ball in the park next to a big old tree"],
]


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


def batcher(engine: Any, max_batch_size: int = 8) -> Batcher:
    return Batcher(
        engine, max_batch_size=max_batch_size, max_wait_ms=1.0, max_queue=64, metrics=Metrics()
    )


def test_text_embeddings_do_not_depend_on_the_batch(engine: blipitm.Engine) -> None:
    b = batcher(engine)
    futures = [b.submit(EmbedTexts(t)) for t in TEXTS]  # queued first: one merged batch
    b.start()
    try:
        for texts, fut in zip(TEXTS, futures, strict=True):
            got, alone = fut.result(30), engine.encode_texts(texts)
            np.testing.assert_allclose(got.embeddings, alone.embeddings, atol=TOL, rtol=0)
            assert got.text_tokens.tolist() == alone.text_tokens.tolist()
    finally:
        b.stop()


def test_pair_scores_do_not_depend_on_the_batch(engine: blipitm.Engine) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    jobs = [
        ScorePairs([images[0]], TEXTS[1], [(0, 0), (0, 1)]),
        ScorePairs([images[1], images[2]], TEXTS[0] + TEXTS[3], [(0, 1), (1, 0), (1, 1)]),
        ScorePairs([images[0]], TEXTS[2], [(0, 0)]),
    ]
    b = batcher(engine)
    futures = [b.submit(j) for j in jobs]
    b.start()
    try:
        for job, fut in zip(jobs, futures, strict=True):
            got = fut.result(30)
            alone = engine.score_pairs(job.images, job.texts, job.pairs)
            np.testing.assert_allclose(got.itm_logits, alone.itm_logits, atol=TOL, rtol=0)
            np.testing.assert_allclose(got.itc_cosine, alone.itc_cosine, atol=TOL, rtol=0)
    finally:
        b.stop()


class RecordingEngine:
    """Records the texts of each engine call; the first call waits for ``gate``."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()

    def encode_texts(self, texts: list[str]) -> TextFeatures:
        assert self.gate.wait(10)
        self.calls.append(list(texts))
        return TextFeatures(np.zeros((len(texts), 2), np.float32), np.ones(len(texts), np.int64))


def test_requests_are_served_in_arrival_order_without_starvation() -> None:
    """FIFO across batches: with more queued than one batch holds, the oldest go first, so a
    request waits at most ceil(depth / max_batch_size) batches however many arrive after it."""
    engine = RecordingEngine()
    b = batcher(engine, max_batch_size=3)
    b.start()
    try:
        first = b.submit(EmbedTexts(["t0"]))  # the worker takes it and blocks on the gate
        while b.depth:
            threading.Event().wait(0.01)
        rest = [b.submit(EmbedTexts([f"t{i}"])) for i in range(1, 8)]
        engine.gate.set()
        for f in [first, *rest]:
            f.result(10)
        assert engine.calls == [["t0"], ["t1", "t2", "t3"], ["t4", "t5", "t6"], ["t7"]]
    finally:
        engine.gate.set()
        b.stop()
