"""Caption generation: greedy search, beam search and nucleus sampling over a decoder.

Each algorithm is written to give the tokens ``transformers``' ``generate`` gives for
``BlipForConditionalGeneration`` (5.x; docs/captioner.md says which settings): the same logits
processors in the same order (repetition penalty, then the minimum length; for sampling then
the temperature, top-k and top-p), the same stopping rules (``[SEP]`` or ``max_length``, both
counted over the whole sequence, prompt included) and, for beam search, the same vectorised
bookkeeping (``2 * num_beams`` candidates a step, scores divided by the generated length to the
power ``length_penalty`` when a beam finishes, ``early_stopping=False``'s heuristic). Nothing is
taken from transformers; ``tests/test_captioner.py`` holds the two to the same tokens.

The algorithms drive a :class:`Stepper`, which owns the model state (caches) and the layout of
rows: ``start`` runs the prompt of every row, ``advance`` feeds one token per row after keeping
(and reordering) rows. Rows are image-major. Greedy search and sampling drop finished rows; beam
search reorders beams within their image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from blipitm.errors import InvalidInputError
from blipitm.model import BlipCaptioner, DecoderCache, DenseKV
from blipitm.model.text import CrossKV

# transformers' beam search marks impossible candidates by adding this (not -inf), and so do we:
# the same arithmetic gives the same ranking of candidates.
NEG = -1.0e9

FinishReason = Literal["stop", "length"]  # ended with [SEP]; reached max_length without it


@dataclass(frozen=True)
class Generated:
    """One caption as the search produced it."""

    tokens: list[int]  # after the prompt, the closing [SEP] not included
    finish_reason: FinishReason


class Stepper(Protocol):
    def start(self, ids: torch.Tensor, rows_per_image: Sequence[int]) -> torch.Tensor:
        """Prompt ``ids [R, T0]`` of every row -> next-token logits ``[R, V]``."""
        ...

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Keep rows ``keep [R']`` (indices into the previous rows, image-major), append
        ``tokens [R']`` to them -> logits ``[R', V]``."""
        ...


@dataclass(frozen=True)
class Search:
    """How to generate; checked by :meth:`checked`. Lengths count the prompt's tokens."""

    max_length: int
    min_length: int = 0
    num_beams: int = 1
    sample: bool = False
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    temperature: float = 1.0  # sampling only: scores / temperature before top-k and top-p
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return: int = 1
    eos_token_id: int = 102
    pad_token_id: int = 0

    def checked(self, prompt_tokens: int, max_positions: int) -> Search:
        """Refuse settings that cannot run, naming the argument."""

        def bad(name: str, reason: str) -> InvalidInputError:
            return InvalidInputError(reason, loc=(name,))

        if self.num_beams < 1:
            raise bad("num_beams", f"must be >= 1, got {self.num_beams}")
        if self.num_return < 1:
            raise bad("num_captions", f"must be >= 1, got {self.num_return}")
        if self.sample and self.num_beams != 1:
            raise bad("num_beams", "sampling draws each caption on its own; leave num_beams unset")
        if not self.sample and self.num_return > self.num_beams:
            raise bad(
                "num_captions",
                f"{self.num_return} captions need num_beams >= {self.num_return} (the best beams) "
                "or sample=True",
            )
        if self.max_length > max_positions:
            raise bad(
                "max_length", f"the model has {max_positions} positions, got {self.max_length}"
            )
        if self.max_length <= prompt_tokens:
            raise bad(
                "max_length",
                f"max_length {self.max_length} leaves no room for a caption after the prompt's "
                f"{prompt_tokens} tokens (lengths count the prompt)",
            )
        if not 0 <= self.min_length <= self.max_length:
            raise bad("min_length", f"must be in [0, max_length={self.max_length}]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise bad("temperature", f"must be a finite number > 0, got {self.temperature}")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        return self


# -- logits processors ---------------------------------------------------------------------------


def repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in ``seqs [R, T]`` (prompt included): a negative
    score is multiplied by ``penalty``, a positive one divided. ``scores [R, V]``."""
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, seqs)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, seqs, seen)


def forbid_eos(scores: torch.Tensor, length: int, min_length: int, eos: int) -> torch.Tensor:
    """``[SEP]`` impossible while the sequence is shorter than ``min_length``."""
    if length >= min_length:
        return scores
    out = scores.clone()
    out[:, eos] = -float("inf")
    return out


def temperature_scale(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scores / temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature == 1.0:
        return scores
    return scores / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores of each row (ties with the k-th kept too); others -inf."""
    if k <= 0:
        return scores
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens whose probabilities sum to at least ``p``
    (at least one); the others -inf. ``scores [R, V]`` are logits (any shift)."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)  # the least probable tokens whose mass stays within 1 - p
    drop[..., -1:] = False  # the most probable token always stays
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


# -- greedy search and sampling ------------------------------------------------------------------


def greedy_or_sample(
    stepper: Stepper,
    prompt: torch.Tensor,
    search: Search,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[list[Generated]]:
    """``prompt [G, T0]`` -> per image, ``num_return`` captions.

    ``generator``: one stream for the whole batch, or one per image (then an image's draws
    depend on nothing but its own rows: the same captions in any batch, as CapFilt's per-sample
    seeds need)."""
    g, t0 = prompt.shape
    m = search.num_return if search.sample else 1
    seqs = prompt.repeat_interleave(m, dim=0)  # [R, T] the live rows' sequences
    alive = torch.arange(g * m)  # original row of each live row
    out: list[list[int]] = [[] for _ in range(g * m)]
    reasons: list[FinishReason] = ["length"] * (g * m)
    logits = stepper.start(seqs, [m] * g)
    length = t0
    while True:
        scores = repetition_penalty(logits.float(), seqs, search.repetition_penalty)
        scores = forbid_eos(scores, length, search.min_length, search.eos_token_id)
        if search.sample:
            scores = temperature_scale(scores, search.temperature)
            scores = top_p_filter(top_k_filter(scores, search.top_k), search.top_p)
            tokens = _draw(scores.softmax(dim=-1), alive // m, generator)
        else:
            tokens = scores.argmax(dim=-1)
        length += 1
        done = (tokens == search.eos_token_id) | (length >= search.max_length)
        for row, token, finished in zip(
            alive.tolist(), tokens.tolist(), done.tolist(), strict=True
        ):
            if finished and token == search.eos_token_id:
                reasons[row] = "stop"
            else:
                out[row].append(token)
        if bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(1)
        alive = alive[keep.cpu()]
        seqs = torch.cat([seqs, tokens[:, None]], dim=1).index_select(0, keep.to(seqs.device))
        logits = stepper.advance(tokens[keep], keep)
    captions = [Generated(t, r) for t, r in zip(out, reasons, strict=True)]
    return [captions[i * m : (i + 1) * m] for i in range(g)]


def _draw(
    probs: torch.Tensor,
    images: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """One token per row of ``probs [R, V]``; ``images [R]``: each live row's image, the index
    into ``generator`` when it is one stream per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for image in images.unique().tolist():  # rows are image-major: each image's rows in order
        rows = (images == image).nonzero().squeeze(1).to(probs.device)
        tokens[rows] = torch.multinomial(probs[rows], 1, generator=generator[image])[:, 0]
    return tokens


# -- beam search -----------------------------------------------------------------------------------


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [G, K, ...]`` rows ``index [G, K']`` of each image -> ``[G, K', ...]``."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def beam_search(stepper: Stepper, prompt: torch.Tensor, search: Search) -> list[list[Generated]]:
    """``prompt [G, T0]`` -> per image, its ``num_return`` best beams, best first."""
    g, t0 = prompt.shape
    nb, total, eos = search.num_beams, search.max_length, search.eos_token_id
    device = prompt.device
    k = 2 * nb  # candidates kept a step: enough that nb survive if nb of them end in [SEP]
    running = torch.full((g, nb, total), eos, dtype=torch.long, device=device)  # [G, nb, L]
    running[:, :, :t0] = prompt[:, None]
    finished_seqs = running.clone()
    running_scores = torch.zeros((g, nb), device=device)
    running_scores[:, 1:] = NEG  # at the first step only beam 0's continuations count
    finished_scores = torch.full((g, nb), NEG, device=device)
    is_finished = torch.zeros((g, nb), dtype=torch.bool, device=device)
    finished_by_eos = torch.zeros((g, nb), dtype=torch.bool, device=device)  # else by length
    improvable = torch.ones((g, 1), dtype=torch.bool, device=device)
    top_nb = torch.arange(k, device=device) < nb  # only the best nb candidates may finish
    offsets = torch.arange(g, device=device)[:, None] * nb  # [G, 1] first row of each image

    logits = stepper.start(running[:, :, :t0].reshape(g * nb, t0), [nb] * g)
    length = t0
    while True:
        flat_seqs = running[:, :, :length].reshape(g * nb, length)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [G*nb, V]
        log_probs = repetition_penalty(log_probs, flat_seqs, search.repetition_penalty)
        log_probs = forbid_eos(log_probs, length, search.min_length, eos)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(g, nb, vocab) + running_scores[:, :, None]
        cand_scores, cand = torch.topk(log_probs.reshape(g, nb * vocab), k)  # [G, K]
        cand_beam, cand_token = cand // vocab, cand % vocab
        cand_seqs = _gather(running, cand_beam)  # [G, K, L]
        cand_seqs[:, :, length] = cand_token
        ends = (cand_token == eos) | (length + 1 >= total)  # [G, K]

        # The best nb candidates that go on.
        going = cand_scores + ends.to(torch.float32) * NEG
        pick = torch.topk(going, nb)[1]  # [G, nb]
        running = _gather(cand_seqs, pick)
        running_scores = _gather(going, pick)
        source_beam = _gather(cand_beam, pick)  # [G, nb]

        # Candidates that end here join the finished beams if they beat them.
        just_ended = ends & top_nb[None, :]
        ended_scores = cand_scores / ((length + 1 - t0) ** search.length_penalty)
        ended_scores = ended_scores + (~improvable).to(torch.float32) * NEG
        ended_scores = ended_scores + (~just_ended) * NEG
        merged = torch.topk(torch.cat((finished_scores, ended_scores), dim=1), nb)[1]
        finished_seqs = _gather(torch.cat((finished_seqs, cand_seqs), dim=1), merged)
        finished_scores = _gather(torch.cat((finished_scores, ended_scores), dim=1), merged)
        is_finished = _gather(torch.cat((is_finished, just_ended), dim=1), merged)
        by_eos = cand_token == eos
        finished_by_eos = _gather(torch.cat((finished_by_eos, by_eos), dim=1), merged)

        length += 1
        # early_stopping=False: stop an image once its best running beam, at today's length,
        # cannot beat its worst finished beam (all nb finished).
        best_running = running_scores[:, :1] / ((length - t0) ** search.length_penalty)
        worst_finished = torch.where(
            is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG
        )
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        keep = (offsets + source_beam).reshape(-1)
        logits = stepper.advance(running[:, :, length - 1].reshape(-1), keep)

    out: list[list[Generated]] = []
    n = search.num_return
    for image, stops in zip(
        finished_seqs[:, :n].tolist(), finished_by_eos[:, :n].tolist(), strict=True
    ):
        out.append(
            [
                Generated(_until_eos(seq[t0:], eos), "stop" if stop else "length")
                for seq, stop in zip(image, stops, strict=True)
            ]
        )
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# -- steppers --------------------------------------------------------------------------------------


def _rows_per_image(images_of_rows: torch.Tensor, images: int) -> list[int]:
    return [int(c) for c in torch.bincount(images_of_rows, minlength=images).tolist()]


def _cross_for(kv: DenseKV, counts: list[int]) -> tuple[CrossKV, list[int]]:
    """The cross-attention K/V and row counts of the images that still have rows: the dense
    tensors when every image has the same number (one batched call), else per-image views."""
    if counts and all(c == counts[0] for c in counts) and counts[0] > 0:
        return kv, counts
    present = [i for i, c in enumerate(counts) if c]
    views = [([k[i : i + 1] for i in present], [v[i : i + 1] for i in present]) for k, v in kv]
    return views, [counts[i] for i in present]


class CachedStepper:
    """Decodes with the image's cross-attention K/V computed once and a self-attention cache."""

    def __init__(self, model: BlipCaptioner, cross_kv: DenseKV, capacity: int) -> None:
        self.model = model
        self.kv = cross_kv
        self.images = cross_kv[0][0].shape[0]
        self.capacity = capacity
        self.cache: DecoderCache | None = None
        self.images_of_rows = torch.zeros(0, dtype=torch.long)

    def start(self, ids: torch.Tensor, rows_per_image: Sequence[int]) -> torch.Tensor:
        k0 = self.kv[0][0]
        self.cache = self.model.new_cache(
            ids.shape[0], self.capacity, dtype=k0.dtype, device=k0.device
        )
        self.images_of_rows = torch.repeat_interleave(torch.tensor(list(rows_per_image)))
        return self._decode(ids)

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None
        if keep.numel() != self.images_of_rows.numel() or bool(
            (keep.cpu() != torch.arange(keep.numel())).any()
        ):
            self.cache = self.cache.select(keep.to(self.cache.keys[0].device))
            self.images_of_rows = self.images_of_rows[keep.cpu()]
        return self._decode(tokens[:, None])

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None
        kv, rows = _cross_for(self.kv, _rows_per_image(self.images_of_rows, self.images))
        return self.model.decode(ids, self.cache, kv, rows)


class PlainStepper:
    """The reference path: every step runs the whole sequence from scratch, cross-attention
    K/V recomputed from the image tokens each time; no state is carried between steps."""

    def __init__(self, model: BlipCaptioner, image_tokens: torch.Tensor) -> None:
        self.model = model
        self.image_tokens = image_tokens  # [G, N, Dv]
        self.ids = torch.zeros(0, 0, dtype=torch.long)
        self.images_of_rows = torch.zeros(0, dtype=torch.long)

    def start(self, ids: torch.Tensor, rows_per_image: Sequence[int]) -> torch.Tensor:
        self.ids = ids
        self.images_of_rows = torch.repeat_interleave(torch.tensor(list(rows_per_image)))
        return self._run()

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids.index_select(0, keep), tokens[:, None]], dim=1)
        self.images_of_rows = self.images_of_rows[keep.cpu()]
        return self._run()

    def _run(self) -> torch.Tensor:
        counts = _rows_per_image(self.images_of_rows, self.image_tokens.shape[0])
        kv, rows = _cross_for(self.model.cross_kv(self.image_tokens), counts)
        cache = self.model.new_cache(
            self.ids.shape[0],
            self.ids.shape[1],
            dtype=self.image_tokens.dtype,
            device=self.image_tokens.device,
        )
        return self.model.decode(self.ids, cache, kv, rows)
