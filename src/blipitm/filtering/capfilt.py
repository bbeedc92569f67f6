"""CapFilt's bootstrap (BLIP, section 3.3): a captioner writes synthetic captions for each web
image with nucleus sampling, and the ITM filter keeps the captions, original and synthetic,
that match.

This module is only the captioning step. A :class:`CapFilt` says how to caption; a
:class:`Captioning` (the loaded captioner with those settings) adds K synthetic captions to each
batch of samples before :func:`~blipitm.filtering.scoring.score_batch` scores them, inside the
filter's own per-shard function. So the cut, the resume by done markers, the outputs and the
Ray runner are the filter's, unchanged; what CapFilt adds is a ``source`` per score row
(``original`` / ``synthetic``), the kept captions with their source and scores, and the counts
per source in ``stats.json``. See docs/capfilt.md.

Determinism: each sample draws from its own random stream, seeded from (seed, shard name,
sample key), so its synthetic captions do not depend on the batch it came in, the number of
workers, or whether its shard was redone after an interruption.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from blipitm.common.identity import recorded_source, weights_digest
from blipitm.engine.options import LoadOptions
from blipitm.errors import CheckpointError, InvalidInputError
from blipitm.filtering.readers import Sample
from blipitm.filtering.runs import RayRun, options_of
from blipitm.filtering.scoring import refused_item

if TYPE_CHECKING:
    from blipitm.engine.captioner import Captioner

Source = Literal["original", "synthetic"]
SOURCES: tuple[Source, ...] = ("original", "synthetic")
# BLIP's nucleus sampling for CapFilt (its generate(sample=True): top_p 0.9; the repetition
# penalty of 1.1 is the captioner's default when sampling).
DEFAULT_TOP_P = 0.9


@dataclass(frozen=True)
class CapFilt:
    """How a filtering run bootstraps its captions: ``synthetic`` (K) captions per image from
    ``captioner`` (a loaded :class:`~blipitm.engine.captioner.Captioner`, or the
    :class:`LoadOptions` of one) by nucleus sampling with ``top_p``, reproducible from ``seed``.
    ``max_length`` / ``min_length`` count the prompt's tokens, as ``Captioner.caption`` does
    (None: the captioner's default, 20 tokens after the prompt)."""

    captioner: LoadOptions | Captioner
    synthetic: int = 1
    seed: int = 0
    top_p: float = DEFAULT_TOP_P
    max_length: int | None = None
    min_length: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.captioner, (str, os.PathLike)):
            raise InvalidInputError(
                "must be a Captioner or a LoadOptions: LoadOptions(source) names a checkpoint",
                loc=("captioner",),
            )
        if isinstance(self.synthetic, bool) or not isinstance(self.synthetic, int):
            raise InvalidInputError(
                f"must be an integer, got {self.synthetic!r}", loc=("synthetic",)
            )
        if self.synthetic < 1:
            raise InvalidInputError(
                f"must be >= 1 (synthetic captions per image), got {self.synthetic}",
                loc=("synthetic",),
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"must be in (0, 1], got {self.top_p}", loc=("top_p",))
        if self.min_length < 0:
            raise InvalidInputError(f"must be >= 0, got {self.min_length}", loc=("min_length",))
        if self.max_length is not None and self.max_length < 1:
            raise InvalidInputError(f"must be >= 1, got {self.max_length}", loc=("max_length",))

    def settings(self) -> dict[str, Any]:
        """What changes the synthetic captions besides the captioner's weights."""
        return {
            "synthetic": self.synthetic,
            "seed": self.seed,
            "top_p": self.top_p,
            "max_length": self.max_length,
            "min_length": self.min_length,
        }


def open_captioner(captioner: LoadOptions | Captioner, *, name: str = "captioner") -> Captioner:
    """``captioner`` loaded (or as given); a checkpoint that cannot be the captioner (an ITM
    model, a missing path) is an :class:`InvalidInputError` naming ``name``, the option."""
    if not isinstance(captioner, LoadOptions):
        return captioner
    from blipitm.engine.captioner import load_captioner_options

    try:
        return load_captioner_options(captioner)
    except CheckpointError as e:
        raise InvalidInputError(str(e), loc=(name,)) from None


def captioner_record(captioner: Captioner) -> dict[str, Any]:
    """The captioner's identity as the manifest records it: what pins its captions."""
    info = captioner.info
    return {
        "source": recorded_source(info.source),
        "revision": info.revision,
        "commit": info.commit,
        "protocol": info.protocol,
        "dtype": info.dtype,
        "compute_dtype": info.compute_dtype,
        "weights_sha256": weights_digest(info.source),
    }


def in_actor(capfilt: CapFilt, run: RayRun) -> CapFilt:
    """A CapFilt run's settings in a Ray actor: its captioner on the actor's GPU as well as the
    matching model (:meth:`RayRun.actor_options`)."""
    assert isinstance(capfilt.captioner, LoadOptions)  # Captioning.for_actors made it so
    return replace(capfilt, captioner=run.actor_options(capfilt.captioner))


def sample_seed(seed: int, shard: str, key: str) -> int:
    """The seed of one sample's random stream: a hash of (seed, shard name, sample key), so that
    it depends on nothing a rerun, another batch size or another worker count changes."""
    digest = hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a valid torch seed


class Captioning:
    """The captioning step of a CapFilt run: a loaded captioner with the run's settings."""

    def __init__(self, captioner: Captioner, capfilt: CapFilt) -> None:
        self.captioner = captioner
        self.capfilt = capfilt

    def record(self) -> dict[str, Any]:
        """The manifest's ``capfilt`` entry: a resumed run must caption as this one did."""
        return {"captioner": captioner_record(self.captioner), **self.capfilt.settings()}

    def for_actors(self) -> CapFilt:
        """The settings a Ray actor loads its own captioner from: the options given, or those
        of the captioner given (as :func:`~blipitm.filtering.runs.options_of` for an engine)."""
        if isinstance(self.capfilt.captioner, LoadOptions):
            return self.capfilt
        return replace(self.capfilt, captioner=options_of(self.captioner))

    def add(self, samples: Sequence[Sample], shard: str) -> tuple[list[Sample], list[int]]:
        """``samples`` with K synthetic captions after their own, and each one's count of
        original captions. Only samples the reader accepted are captioned; one whose image the
        captioner refuses becomes ``bad_image`` (so the filter does not try it again) and the
        others are captioned without it."""
        c = self.capfilt
        todo = [i for i, s in enumerate(samples) if s.status == "ok" and s.image is not None]
        refused: dict[int, str] = {}
        while True:
            live = [i for i in todo if i not in refused]
            if not live:
                results = []
                break
            try:
                results = self.captioner.caption(
                    [samples[i].image for i in live],  # type: ignore[misc]
                    sample=True,
                    seed=[sample_seed(c.seed, shard, samples[i].key) for i in live],
                    num_captions=c.synthetic,
                    top_p=c.top_p,
                    max_length=c.max_length,
                    min_length=c.min_length,
                )
                break
            except InvalidInputError as e:
                refused[live[refused_item(e, "images")]] = str(e)
        synthetic = dict(zip(live, (r.captions for r in results), strict=True))
        out = []
        for i, s in enumerate(samples):
            if i in refused:
                s = replace(s, status="bad_image", error=refused[i])
            elif i in synthetic:
                s = replace(s, captions=[*s.captions, *synthetic[i]])
            out.append(s)
        return out, [len(s.captions) for s in samples]


def row_sources(rows: dict[str, list[Any]], originals: Sequence[int]) -> list[Source]:
    """The ``source`` of each score row of :func:`~blipitm.filtering.scoring.score_batch`:
    a sample's first ``originals[i]`` candidates are its own captions, the rest the
    captioner's (a row without a caption, of a sample that has none, counts as original)."""
    return [
        "synthetic" if caption is not None and c >= originals[i] else "original"
        for i, c, caption in zip(rows["sample"], rows["candidate"], rows["caption"], strict=True)
    ]
