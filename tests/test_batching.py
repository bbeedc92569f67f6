"""The server's batching with the real engine: what a request gets back does not depend on which
other requests shared its batch, and requests are served in the order they came.

Since the text encoder runs packed (no padding rows), the server needs no length bucketing across
requests: a short text batched with long ones costs and returns what it would alone. Reference:
each request run alone through the engine (fp32; measured differences ~1e-7, tolerance 5e-6).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.engine import TextFeatures
from blipitm.engine.batcher import Batcher, QueueFull
from blipitm.engine.jobs import EmbedTexts, ScorePairs

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
    return Batcher(engine, max_batch_size=max_batch_size, max_wait_ms=1.0, max_queue=64)


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


# -- the batcher knows no job class ---------------------------------------------------------------


@dataclass(frozen=True)
class Double:
    """A job the batcher has never heard of: mergeable, so jobs queued together share a call."""

    values: list[int]

    def run(self, engine: Any) -> list[int]:
        engine.calls.append(list(self.values))
        return [2 * v for v in self.values]

    @classmethod
    def merge(cls, jobs: Sequence[Double]) -> tuple[Double, Callable[[Any], list[Any]]]:
        sizes = [len(j.values) for j in jobs]

        def split(out: list[int]) -> list[list[int]]:
            ends = list(itertools.accumulate(sizes))
            return [out[end - n : end] for n, end in zip(sizes, ends, strict=True)]

        return cls([v for j in jobs for v in j.values]), split


@dataclass(frozen=True)
class Negate:
    """Not mergeable (no ``merge``): each runs alone, even beside others of its class."""

    value: int

    def run(self, engine: Any) -> int:
        engine.calls.append([self.value])
        return -self.value


class Calls:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def queue_depth(self, depth: int) -> None:
        self.events.append(("queue_depth", depth))

    def refused(self) -> None:
        self.events.append(("refused", None))

    def waited(self, seconds: float) -> None:
        self.events.append(("waited", seconds >= 0))

    def batch_started(self, size: int) -> None:
        self.events.append(("batch_started", size))

    def batch_finished(self, seconds: float) -> None:
        self.events.append(("batch_finished", seconds >= 0))


def test_jobs_are_dispatched_by_their_methods() -> None:
    """A new endpoint's job needs no batcher edit: ``run`` runs it, ``merge`` (if it has one)
    merges it with the others of its class, and each gets its own share back."""
    engine: Any = Calls()
    b = Batcher(engine, max_batch_size=8, max_wait_ms=1.0, max_queue=8)
    futures = [b.submit(Double([1, 2])), b.submit(Negate(5)), b.submit(Double([3]))]
    futures.append(b.submit(Negate(6)))
    b.start()
    try:
        assert [f.result(10) for f in futures] == [[2, 4], -5, [6], -6]
        assert sorted(engine.calls) == [[1, 2, 3], [5], [6]]
    finally:
        b.stop()


def test_the_observer_sees_queue_refusals_and_batches() -> None:
    observer = RecordingObserver()
    engine: Any = Calls()
    b = Batcher(engine, max_batch_size=8, max_wait_ms=1.0, max_queue=2, observer=observer)
    first, second = b.submit(Negate(1)), b.submit(Negate(2))
    with pytest.raises(QueueFull):
        b.submit(Negate(3))
    b.start()
    try:
        assert (first.result(10), second.result(10)) == (-1, -2)
    finally:
        b.stop()
    assert observer.events == [
        ("queue_depth", 1),
        ("queue_depth", 2),
        ("refused", None),
        ("queue_depth", 0),
        ("waited", True),
        ("waited", True),
        ("batch_started", 2),
        ("batch_finished", True),
    ]


def test_background_jobs_run_only_when_no_online_job_waits(engine: blipitm.Engine) -> None:
    """The Batch API's lane: background jobs queued before online ones still run after them,
    and a full online queue neither refuses nor counts them."""

    class Recording:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def encode_texts(self, texts: list[str]) -> TextFeatures:
            self.calls.append(list(texts))
            return engine.encode_texts(texts)

    recording = Recording()
    b = Batcher(recording, max_batch_size=1, max_wait_ms=0.0, max_queue=2)  # type: ignore[arg-type]
    background = [b.submit(EmbedTexts([f"bg{i}"]), background=True) for i in range(4)]
    online = [b.submit(EmbedTexts([f"on{i}"])) for i in range(2)]
    assert b.depth == 2 and b.background_depth == 4 and not b.has_room()
    with pytest.raises(QueueFull):
        b.submit(EmbedTexts(["one too many"]))
    extra = b.submit(EmbedTexts(["bg4"]), background=True)  # never refused
    b.start()
    try:
        for fut in [*online, *background, extra]:
            fut.result(30)
    finally:
        b.stop()
    assert [c[0] for c in recording.calls] == ["on0", "on1", "bg0", "bg1", "bg2", "bg3", "bg4"]


def test_a_worker_batch_of_background_jobs_is_kept_short(engine: blipitm.Engine) -> None:
    """At most max_background_batch background jobs in one worker batch, and an online job
    queued first is taken alone."""
    b = Batcher(engine, max_batch_size=8, max_wait_ms=1.0, max_queue=8, max_background_batch=2)
    sizes: list[int] = []

    class Sizes:
        def __getattr__(self, name: str) -> Any:
            return lambda *a: None

        def batch_started(self, size: int) -> None:
            sizes.append(size)

    b.observer = Sizes()  # type: ignore[assignment]
    futures = [b.submit(EmbedTexts([f"bg{i}"]), background=True) for i in range(6)]
    futures.append(b.submit(EmbedTexts(["online"])))  # taken first, and alone
    b.start()
    try:
        for fut in futures:
            fut.result(30)
    finally:
        b.stop()
    assert sizes == [1, 2, 2, 2]


def test_an_online_job_runs_between_two_layers_of_a_background_batch(
    engine: blipitm.Engine,
) -> None:
    """A background call yields at its next layer to an online job queued while it runs: the
    online job is answered before the background call returns, and both get what they would
    alone."""
    events: list[str] = []
    online: list[Any] = []

    class Interrupted:
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def encode_texts(self, texts: list[str]) -> TextFeatures:
            if texts == ["background"]:
                # Queued while the background call runs (submit never blocks the worker).
                online.append(b.submit(EmbedTexts(["online"])))
                out = engine.encode_texts(texts)
                events.append(f"background returned; online done: {online[0].done()}")
                return out
            events.append("online ran")
            return engine.encode_texts(texts)

    b = Batcher(Interrupted(), max_batch_size=8, max_wait_ms=0.0, max_queue=8)  # type: ignore[arg-type]
    background = b.submit(EmbedTexts(["background"]), background=True)
    b.start()
    try:
        got = background.result(30)
        answer = online[0].result(30)
    finally:
        b.stop()
    assert events == ["online ran", "background returned; online done: True"]
    for feats, text in ((got, "background"), (answer, "online")):
        alone = engine.encode_texts([text])
        np.testing.assert_allclose(feats.embeddings, alone.embeddings, rtol=0, atol=1e-6)


def test_grad_cam_never_yields_while_its_probe_is_on_the_model(engine: blipitm.Engine) -> None:
    """Other work run at a yield point would pass through the probed layer: Grad-CAM's pass has
    no yield points, and an explanation with online work run at every other yield point equals
    one without."""
    from blipitm.preemption import yielding_to

    image = Image.new("RGB", (40, 30), (90, 160, 40))
    texts = ["a green field", "a red car"]
    plain = engine.explain_batch(image, texts, layer=1)
    layers = engine.model.text_encoder.encoder.layer
    ran: list[bool] = []

    def online_work() -> None:
        assert all(layer.crossattention.probe is None for layer in layers)
        with yielding_to(None):  # as the batcher runs it: no yield points of its own
            engine.encode_texts(["online work at a yield point"])
        ran.append(True)

    engine.cache.clear()  # the image is encoded again: the vision tower's yield points run
    with yielding_to(online_work):
        busy = engine.explain_batch(image, texts, layer=1)
    assert ran  # yield points outside Grad-CAM's pass did run the work
    for a, b in zip(plain, busy, strict=True):
        np.testing.assert_allclose(a.token_maps, b.token_maps, rtol=0, atol=1e-6)
        assert a.itm_probability == pytest.approx(b.itm_probability, abs=1e-6)
