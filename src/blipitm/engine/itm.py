"""ITM scoring: cross-attention keys/values per image (assembled, cached) and the pass schedule.

Projecting an image's tokens to the text encoder's cross-attention keys/values is most of an ITM
pass for a short caption and depends on the image only (docs/architecture.md, cost model); so it
is done once per image per call, shared by every text scored against the image, and cached by the
image's content key while the cache has room.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from blipitm.engine.cache import ByteLRU
from blipitm.engine.images import EncodedImage
from blipitm.engine.texts import length_batches
from blipitm.model import BlipITM, CrossKV, DenseKV
from blipitm.processing.tokenizer import pad
from blipitm.scoring import ScoringProtocol

KV_ENTRY = "kv"  # cache keys: (KV_ENTRY, content key) -> one image's K/V, [1, h, N, d] per layer


class ITMScorer:
    """ITM logits of (image, text) pairs, scheduled so each image's K/V is computed once."""

    def __init__(
        self,
        model: BlipITM,
        protocol: ScoringProtocol,
        cache: ByteLRU,
        *,
        device: torch.device,
        compute_dtype: torch.dtype,
        image_batch: int,
        text_batch: int,
    ) -> None:
        self.model = model
        self.protocol = protocol
        self.cache = cache
        self.device = device
        self.compute_dtype = compute_dtype
        self.image_batch = image_batch
        self.text_batch = text_batch

    def logits(
        self,
        feats: Sequence[EncodedImage],
        ids: Sequence[Sequence[int]],
        image_of_pair: Sequence[int],
        text_of_pair: Sequence[int],
    ) -> np.ndarray:
        """ITM logits ``[P, 2]`` float32; pair p is feats[image_of_pair[p]], ids[text_of_pair[p]].

        Images with several texts run one image at a time with its texts as the query block
        (keys/values computed once). Images with one text are batched: those whose K/V is
        cached ``text_batch`` to a pass (no new memory; the text GEMMs get rows enough to run
        near the peak), the others ``image_batch`` to a pass, which bounds the K/V in memory.
        """
        first = self.protocol.itm_first_token
        ids = [[first, *row[1:]] for row in ids]  # the ITM pass's first token
        out = np.empty((len(image_of_pair), 2), dtype=np.float32)
        by_image: dict[int, list[int]] = {}
        for p, g in enumerate(image_of_pair):
            by_image.setdefault(g, []).append(p)
        singles = [ps[0] for ps in by_image.values() if len(ps) == 1]
        cached: list[int] = []
        fresh: list[int] = []
        for p in singles:  # one cache lookup per image
            (cached if self._has_kv(feats[image_of_pair[p]]) else fresh).append(p)
        for g, ps in by_image.items():
            if len(ps) == 1:
                continue
            kv = self.cross_kv([feats[g]])
            for rows in length_batches([ids[text_of_pair[p]] for p in ps], self.text_batch):
                pairs = [ps[r] for r in rows]
                out[pairs] = self.forward([ids[text_of_pair[p]] for p in pairs], kv)
        for group, size in ((cached, self.text_batch), (fresh, self.image_batch)):
            for rows in length_batches([ids[text_of_pair[p]] for p in group], size):
                pairs = [group[r] for r in rows]
                kv = self.cross_kv([feats[image_of_pair[p]] for p in pairs])
                out[pairs] = self.forward([ids[text_of_pair[p]] for p in pairs], kv)
        return out

    def _has_kv(self, feat: EncodedImage) -> bool:
        return feat.key is not None and (KV_ENTRY, feat.key) in self.cache

    def forward(self, rows: Sequence[Sequence[int]], kv: CrossKV) -> np.ndarray:
        """ITM logits ``[B, 2]`` float32 of token rows (ITM first token already in place)."""
        input_ids, mask = pad(rows)
        with torch.inference_mode():
            logits = self.model.itm_logits(input_ids.to(self.device), mask.to(self.device), kv)
        return logits.float().cpu().numpy()

    def cross_kv(self, feats: Sequence[EncodedImage]) -> CrossKV:
        """Stacked cross-attention keys/values ``[G, h, N, d]`` per layer for ``feats``; for one
        image, that image's own :data:`DenseKV`.

        Each image's K/V is cached under its content key while the cache has room, so an image
        scored again (another call, another request) skips the projection.
        """
        per_image: list[DenseKV | None] = [
            self.cache.get((KV_ENTRY, f.key)) if f.key is not None else None for f in feats
        ]
        missing = [g for g, kv in enumerate(per_image) if kv is None]
        if missing:
            tokens = torch.stack([feats[g].tokens for g in missing])  # [M, N, Dv]
            with torch.inference_mode():
                fresh = self.model.cross_kv(tokens.to(self.device, self.compute_dtype))
            if len(missing) == len(feats):
                self._cache([feats[g] for g in missing], fresh)
                return fresh
            for j, g in enumerate(missing):
                per_image[g] = [(k[j : j + 1], v[j : j + 1]) for k, v in fresh]
            self._cache([feats[g] for g in missing], fresh)
        kvs = [kv for kv in per_image if kv is not None]
        if len(kvs) == 1:
            return kvs[0]
        # Per-image tensors, not concatenated: the model attends image by image (cheaper than
        # copying every image's K/V into one batch).
        per_layer: CrossKV = [
            ([kv[i][0] for kv in kvs], [kv[i][1] for kv in kvs]) for i in range(len(kvs[0]))
        ]
        return per_layer

    def _cache(self, feats: Sequence[EncodedImage], kv: DenseKV) -> None:
        if self.cache.max_bytes == 0:
            return
        if len(feats) == 1:  # the tensors are this image's alone: no copy needed
            if feats[0].key is not None:
                self.cache.put((KV_ENTRY, feats[0].key), list(kv))
            return
        for j, f in enumerate(feats):
            if f.key is not None:  # own copies: a slice would pin the whole batch's storage
                self.cache.put(
                    (KV_ENTRY, f.key), _one_block([(k[j : j + 1], v[j : j + 1]) for k, v in kv])
                )


def _one_block(kv: DenseKV) -> DenseKV:
    """A copy of one image's K/V in a single allocation, handed out as per-layer views.

    A cache entry as 2 x layers separate tensors fragments the heap as entries are evicted
    and replaced, and a long run's resident size creeps up well past the cache's budget; one
    block per entry is freed and reused whole.
    """
    block = torch.stack([torch.stack(pair) for pair in kv])  # [L, 2, 1, h, N, d]
    return [(block[i, 0], block[i, 1]) for i in range(block.shape[0])]
