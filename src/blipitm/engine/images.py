"""The image pipeline: any image input to vision tokens and ITC embedding, each image once.

Intake (read a path, hash, look up the cache) and decoding run on a pool of decode threads a
bounded window ahead of the vision encoder, under one budget of full-size pixels; the threads
hand back model-sized pixels only. Duplicates in a call are encoded once, and every encoded
image is cached by its content key, so a later call (another request, another text) skips it.

Nothing here knows about texts or ITM: the ITM scorer and the captioner take what
:meth:`ImagePipeline.features` returns.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from blipitm.engine.cache import ByteLRU
from blipitm.engine.inputs import IMAGE_KINDS, check_images, is_image, read_if_path
from blipitm.engine.types import ImageFeatures
from blipitm.errors import InvalidInputError, Loc
from blipitm.processing.budget import PixelBudget
from blipitm.processing.image import (
    ImageInput,
    ImageSettings,
    ResizedImage,
    content_key,
    load_resized,
    normalize,
)
from blipitm.scoring import ScoringProtocol

T = TypeVar("T")

# The decode budget's name in errors: the library's field and the commands' flag.
BUDGET_SETTING = "decode_budget_pixels or --max-decoded-pixels"
IMAGE_ENTRY = "img"  # cache keys: (IMAGE_ENTRY, content key) -> (tokens, embedding)


class ImageModel(Protocol):
    """What the pipeline needs of a model: its vision tower and the embedding cached beside the
    tokens (the ITM model's ITC embedding; the captioner's is empty)."""

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def image_embedding(self, image_embeds: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EncodedImage:
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


class ImagePipeline:
    """Decodes and encodes images for one model: owns the decode pool, the decode budget, the
    cache of encoded images and the image batch size."""

    def __init__(
        self,
        model: ImageModel,
        settings: ImageSettings,
        protocol: ScoringProtocol,
        cache: ByteLRU,
        *,
        device: torch.device,
        compute_dtype: torch.dtype,
        batch_size: int,
        max_pixels: int | None,
        decode_threads: int | None = None,
        decode_budget_pixels: int | None = None,
    ) -> None:
        """``decode_budget_pixels``: full-size pixels the decode threads may hold at once (see
        :class:`PixelBudget`); default ``max_pixels``, i.e. one largest allowed image at a time or
        several smaller ones. No budget when both are None."""
        self.model = model
        self.settings = settings
        self.protocol = protocol
        self.cache = cache
        self.device = device
        self.compute_dtype = compute_dtype
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        budget = decode_budget_pixels if decode_budget_pixels is not None else max_pixels
        self.budget = None if budget is None else PixelBudget(budget, setting=BUDGET_SETTING)
        self._pool = ThreadPoolExecutor(
            max_workers=self.decode_threads, thread_name_prefix="blipitm-decode"
        )

    @property
    def prefetch_window(self) -> int:
        """Images decoded ahead of the encoder at most: enough to fill the next batch while this
        one encodes, and to keep every decode thread busy."""
        return max(2 * self.batch_size, 2 * self.decode_threads)

    def prepare(self, item: ImageInput, loc: Loc) -> ResizedImage:
        """``item`` decoded and resized once, under the decode budget; :meth:`features` encodes it
        (cached by the source's content key) without decoding it again."""
        if isinstance(item, ResizedImage):
            item.checked(self.settings, self.protocol, loc=loc)
            return item
        if not is_image(item):
            raise InvalidInputError(
                f"expected one image ({IMAGE_KINDS}), got {type(item).__name__}", loc=loc
            )
        return ResizedImage.load(
            read_if_path(item, loc),
            self.settings,
            self.protocol,
            loc=loc,
            max_pixels=self.max_pixels,
            budget=self.budget,
        )

    def decode(self, item: ImageInput, loc: Loc) -> torch.Tensor:
        """Model input ``[3, S, S]`` float32; the full-size image is gone when this returns."""
        pixels = load_resized(
            item,
            self.settings,
            self.protocol,
            loc=loc,
            max_pixels=self.max_pixels,
            budget=self.budget,
        )
        return torch.from_numpy(normalize(pixels, self.settings))

    def features(self, images: Sequence[ImageInput], *, loc: Loc) -> list[EncodedImage]:
        """Features of each image, from the cache or encoded in batches.

        Decode threads work a bounded window ahead of the encoder and hand back model-sized
        pixels only; a batch is encoded as soon as it is full. Duplicates are encoded once. A
        bad item fails the call naming its location (images encoded before it stay cached, so
        a retry without it is cheap).
        """
        check_images(images, loc)
        out: list[EncodedImage | None] = [None] * len(images)
        ready: dict[str, EncodedImage] = {}  # this call's features by content key
        waiting: dict[str, list[int]] = {}  # content key -> positions, for the batch being filled
        batch: list[tuple[str, torch.Tensor]] = []

        def encode_batch() -> None:
            for feat in self._encode([key for key, _ in batch], [px for _, px in batch]):
                assert feat.key is not None
                for pos in waiting.pop(feat.key):
                    out[pos] = feat
                ready[feat.key] = feat
            batch.clear()

        intake = self._prefetch(lambda i: self._intake(images[i], (*loc, i)), range(len(images)))
        for i, got in enumerate(intake):
            if got.key in ready:
                out[i] = ready[got.key]
            elif got.key in waiting:
                waiting[got.key].append(i)
            elif got.cached is not None:
                out[i] = ready[got.key] = EncodedImage(*got.cached, got.key)
            else:
                assert got.pixels is not None
                waiting[got.key] = [i]
                batch.append((got.key, got.pixels))
                if len(batch) == self.batch_size:
                    encode_batch()
        if batch:
            encode_batch()
        return [f for f in out if f is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- steps ------------------------------------------------------------------------------

    def _intake(self, item: ImageInput, loc: Loc) -> _Intake:
        """On a decode thread: read (a path), hash, look up the cache, else decode one image.

        Files are read here, one per thread, not all up front, so a long list of paths costs no
        more memory than a short one.
        """
        source = read_if_path(item, loc)
        if isinstance(source, ResizedImage):  # before the cache, which knows only its source
            source.checked(self.settings, self.protocol, loc=loc)
        key = content_key(source)
        cached = self.cache.get((IMAGE_ENTRY, key))
        if cached is not None:
            return _Intake(key, None, cached)
        return _Intake(key, self.decode(source, loc), None)

    def _encode(self, keys: Sequence[str], pixels: Sequence[torch.Tensor]) -> list[EncodedImage]:
        """One batch through the vision encoder; each image's features cached under its key."""
        batch = torch.stack(list(pixels)).to(self.device, self.compute_dtype)  # [B, 3, S, S]
        with torch.inference_mode():
            tokens = self.model.encode_image(batch)  # [B, N, Dv]
            emb = self.model.image_embedding(tokens).float().cpu()  # [B, E]
        out = []
        for j, key in enumerate(keys):
            # Own copies: a row of the batch would pin the whole batch's storage in the cache.
            feat = EncodedImage(tokens[j].clone(), emb[j].clone(), key)
            self.cache.put((IMAGE_ENTRY, key), (feat.tokens, feat.embedding))
            out.append(feat)
        return out

    def _prefetch(self, fn: Callable[[int], T], items: Sequence[int]) -> Iterator[T]:
        """``map(fn, items)`` on the decode pool, :attr:`prefetch_window` ahead of the consumer.

        Decoding the next batch overlaps with encoding this one; the window keeps memory
        bounded for long lists. An error surfaces when its item is reached.
        """
        pending: deque[Future[T]] = deque()
        it = iter(items)
        try:
            for item in itertools.islice(it, self.prefetch_window):
                pending.append(self._pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(it, 1):
                    pending.append(self._pool.submit(fn, item))
                yield result
        finally:
            for f in pending:
                f.cancel()


def embeddings(feats: Sequence[EncodedImage]) -> np.ndarray:
    """Unit-norm ITC embeddings ``[N, E]`` float32 of encoded images."""
    return torch.stack([f.embedding for f in feats]).numpy()


def from_features(features: ImageFeatures) -> list[EncodedImage]:
    """A caller's features as the engine's own (on the CPU; moved to the device per batch)."""
    tokens = torch.from_numpy(features.tokens)  # shares the memory
    if features.token_dtype == "bfloat16":
        tokens = tokens.view(torch.int16).view(torch.bfloat16)  # numpy holds bfloat16 as bits
    return [
        EncodedImage(tokens[i], torch.from_numpy(features.embeddings[i]), None)
        for i in range(len(features))
    ]


def to_features(feats: Sequence[EncodedImage]) -> ImageFeatures:
    """Encoded images (at least one) as the public record, tokens in the compute dtype."""
    tokens = torch.stack([f.tokens for f in feats]).cpu()  # [N, T, Dv]
    if tokens.dtype == torch.bfloat16:  # numpy has no bfloat16: its raw bits
        return ImageFeatures(tokens.view(torch.int16).numpy().view(np.uint16), embeddings(feats))
    return ImageFeatures(tokens.numpy(), embeddings(feats))
