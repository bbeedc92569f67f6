"""Texts: validated, cleaned and tokenized per protocol, and their ITC embeddings.

Texts are sorted by length into batches (:func:`length_batches`), which the model runs packed,
so no work is spent on padding; the ITM scorer batches its texts the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from blipitm.config import BlipConfig
from blipitm.errors import InvalidInputError, Loc
from blipitm.model import BlipITM
from blipitm.processing.text import clean_caption, validate_text
from blipitm.processing.tokenizer import Tokenizer, pad
from blipitm.scoring import ScoringProtocol

T = TypeVar("T")


class TextEncoder:
    """Tokenizes texts as the protocol reads them and embeds them with the text tower."""

    def __init__(
        self,
        model: BlipITM,
        tokenizer: Tokenizer,
        protocol: ScoringProtocol,
        config: BlipConfig,
        *,
        device: torch.device,
        batch_size: int,
        max_chars: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.device = device
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.max_tokens = config.text.max_position_embeddings
        self.embedding_dim = config.image_text_hidden_size

    def token_ids(self, texts: Sequence[Any], loc: Loc) -> list[list[int]]:
        """Validated, cleaned and tokenized (per protocol) texts with ``[CLS]`` first."""
        clean = [
            clean_caption(validate_text(t, loc=(*loc, i), max_chars=self.max_chars), self.protocol)
            for i, t in enumerate(texts)
        ]
        ids = self.tokenizer.encode(clean, max_length=self.protocol.max_text_tokens)
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise InvalidInputError(
                    f"text is {len(row)} tokens; the model accepts at most {self.max_tokens}. "
                    "Shorten it, or use protocol='blip', which truncates to 35 tokens as BLIP does",
                    loc=(*loc, i),
                )
        return ids

    def embeddings(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit-norm ITC embeddings ``[N, E]`` of tokenized texts (from :meth:`token_ids`)."""
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        for rows in length_batches(ids, self.batch_size):
            input_ids, mask = pad([ids[r] for r in rows])
            with torch.inference_mode():
                emb = self.model.text_embedding(input_ids.to(self.device), mask.to(self.device))
            out[rows] = emb.float().cpu().numpy()
        return out


def token_counts(ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Tokens per text ``[N]`` int64, from :meth:`TextEncoder.token_ids` (the ids the model
    reads)."""
    return np.array([len(row) for row in ids], dtype=np.int64)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def length_batches(ids: Sequence[Sequence[int]], size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (longest first), so padding stays tight."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    yield from chunks(order, size)
