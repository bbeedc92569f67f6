"""``blipitm.load_captioner``: BLIP's captioner behind the engine's image pipeline.

Images go through the same :class:`~blipitm.engine.images.ImagePipeline` as the ITM engine
(decode limits, one decode budget, the protocol's RGB rule, a content-keyed cache of vision
tokens). Each batch of images has its cross-attention keys/values computed once, shared by every
step and every beam or sample of an image; the text decoder keeps a self-attention cache
(:mod:`blipitm.engine.generation` has the search algorithms). docs/captioner.md documents the
defaults and how they relate to BLIP and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from blipitm.checkpoint import ResolvedCheckpoint
from blipitm.config import CAPTION_PROMPT, DEC_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID
from blipitm.engine.cache import ByteLRU
from blipitm.engine.devices import TORCH_DTYPES, default_batch_sizes
from blipitm.engine.generation import (
    CachedStepper,
    Generated,
    Search,
    beam_search,
    greedy_or_sample,
)
from blipitm.engine.images import EncodedImage, ImagePipeline
from blipitm.engine.inputs import as_list, is_image
from blipitm.engine.loader import build_model, input_limits
from blipitm.engine.options import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CAPTION_MODEL,
    DEFAULT_MAX_TEXT_CHARS,
    LoadOptions,
)
from blipitm.engine.types import CaptionResult, ModelInfo
from blipitm.errors import InvalidInputError, Loc
from blipitm.model import BlipCaptioner
from blipitm.processing.image import DEFAULT_MAX_PIXELS, ImageInput, ImageSettings, ResizedImage
from blipitm.processing.tokenizer import Tokenizer
from blipitm.scoring import ScoringProtocol

# Defaults (docs/captioner.md): what transformers' generate does with the hub models, whose
# generation config sets nothing (20 new tokens when no max_length is given, min_length 0,
# length_penalty 1.0, early_stopping False), with BLIP's 3 beams; sampling is BLIP's nucleus
# sampling (top_p 0.9, repetition penalty 1.1) with the top-k of 50 transformers applies.
DEFAULT_NUM_BEAMS = 3
DEFAULT_NEW_TOKENS = 20  # when max_length is not given: the prompt's tokens plus these
DEFAULT_MIN_LENGTH = 0
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 50
DEFAULT_TEMPERATURE = 1.0  # transformers' and BLIP's
SAMPLING_REPETITION_PENALTY = 1.1  # BLIP's generate(sample=True), CapFilt
# Images decoded together (a step's rows: images x beams). More than the vision tower's batch on
# a CPU: the decoder's GEMMs have few rows (BENCHMARKS.md, speed round three: 16 instead of 8 gave
# greedy 1.1-1.2x); its cross-attention K/V, 42 MB per image in float32, bounds it.
DEFAULT_DECODE_BATCH = {"cpu": 16, "cuda": 64}


def load_captioner(
    source: str | os.PathLike[str] = DEFAULT_CAPTION_MODEL, **options: Any
) -> Captioner:
    """Load a BLIP captioning checkpoint (``BlipForConditionalGeneration`` on the hub, or an
    original BLIP captioner ``.pth``) and return a ready :class:`Captioner`.

    The keyword arguments are the fields of :class:`~blipitm.engine.options.LoadOptions`, as for
    :func:`blipitm.load` (protocol, device, dtype, limits, ...).
    """
    return load_captioner_options(LoadOptions(source, **options))


def load_captioner_options(
    options: LoadOptions, resolved: ResolvedCheckpoint | None = None
) -> Captioner:
    """Load the captioner ``options`` name; what the CLI calls (``resolved``: the checkpoint's
    files, if already found)."""
    built = build_model(options, "caption", BlipCaptioner, resolved)
    assert isinstance(built.model, BlipCaptioner)
    return Captioner(
        built.model,
        *built.facade_parts(),
        **input_limits(options),
        image_batch=options.batch_sizes.images if options.batch_sizes else None,
    )


class Captioner:
    """Writes captions for images with one loaded BLIP captioner. Built by
    :func:`load_captioner`; ``images`` is its :class:`ImagePipeline` (decode, cache)."""

    def __init__(
        self,
        model: BlipCaptioner,
        tokenizer: Tokenizer,
        image_settings: ImageSettings,
        info: ModelInfo,
        protocol: ScoringProtocol,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        image_batch: int | None = None,
        decode_threads: int | None = None,
        decode_budget_pixels: int | None = None,
    ) -> None:
        if protocol.name != info.protocol:
            raise ValueError(f"protocol {protocol.name!r}, but the model is {info.protocol!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_text_chars = max_text_chars  # a prompt's limit (the server checks it)
        self.info = info
        self.protocol = protocol
        self.device = torch.device(info.device)
        self.compute_dtype = TORCH_DTYPES[info.compute_dtype]
        model.set_compute_dtype(self.compute_dtype)
        # A caller's image_batch sets both batches; by default they differ (see above).
        encode_batch = image_batch or default_batch_sizes(self.device, self.compute_dtype).images
        self.image_batch = image_batch or DEFAULT_DECODE_BATCH.get(self.device.type, 16)
        self.cache = ByteLRU(cache_bytes)
        self.images = ImagePipeline(
            model,
            image_settings,
            protocol,
            self.cache,
            device=self.device,
            compute_dtype=self.compute_dtype,
            batch_size=encode_batch,
            max_pixels=max_pixels,
            decode_threads=decode_threads,
            decode_budget_pixels=decode_budget_pixels,
        )

    def prepare_image(self, image: ImageInput, loc: Loc = ("image",)) -> ResizedImage:
        """Decode and resize one image now (as :meth:`blipitm.engine.Engine.prepare_image`)."""
        return self.images.prepare(image, loc)

    def prompt_ids(self, prompt: str = CAPTION_PROMPT) -> list[int]:
        """The ids every caption starts from: the prompt's tokens with ``[CLS]`` replaced by
        ``[DEC]`` and the closing ``[SEP]`` dropped (BLIP's ``generate``)."""
        ids = self.tokenizer.encode([prompt])[0]
        return [DEC_TOKEN_ID, *ids[1:-1]]

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        num_beams: int | None = None,
        max_length: int | None = None,
        min_length: int = DEFAULT_MIN_LENGTH,
        sample: bool = False,
        top_p: float = DEFAULT_TOP_P,
        top_k: int = DEFAULT_TOP_K,
        temperature: float = DEFAULT_TEMPERATURE,
        repetition_penalty: float | None = None,
        seed: int | Sequence[int] | None = None,
        num_captions: int = 1,
        prompt: str = CAPTION_PROMPT,
    ) -> list[CaptionResult]:
        """Caption each image (a single image gives a list of one).

        Beam search by default (``num_beams`` 3; 1 is greedy search); ``sample=True`` draws with
        nucleus sampling (``top_p``, ``top_k``; 0 turns top-k off), reproducibly with ``seed``:
        one seed for the call, or one per image (each image then draws from its own stream, so
        its captions do not depend on the batch it came in: CapFilt's per-sample seeds);
        ``temperature`` divides the scores first (sampling only; checked always).
        ``max_length`` and ``min_length`` count the prompt's tokens, as transformers does; without
        ``max_length`` a caption has at most 20 tokens after the prompt (transformers' default).
        ``repetition_penalty`` defaults to 1.0, and to 1.1 when sampling (BLIP's CapFilt).
        ``num_captions``: the best beams (at most ``num_beams``), or that many samples.
        """
        if not isinstance(prompt, str):
            raise InvalidInputError("must be a string", loc=("prompt",))
        prompt_ids = self.prompt_ids(prompt)
        positions = self.info.config.text.max_position_embeddings
        if max_length is None:
            max_length = min(len(prompt_ids) + DEFAULT_NEW_TOKENS, positions)
        search = Search(
            max_length=max_length,
            min_length=min_length,
            num_beams=(1 if sample else DEFAULT_NUM_BEAMS) if num_beams is None else num_beams,
            sample=sample,
            top_p=top_p if sample else 1.0,
            top_k=top_k if sample else 0,
            temperature=temperature,
            repetition_penalty=(
                (SAMPLING_REPETITION_PENALTY if sample else 1.0)
                if repetition_penalty is None
                else repetition_penalty
            ),
            num_return=num_captions,
            eos_token_id=SEP_TOKEN_ID,
            pad_token_id=PAD_TOKEN_ID,
        )
        search.checked(len(prompt_ids), positions)
        image_list, _ = as_list(images, is_image)
        feats = self.images.features(image_list, loc=("images",))
        generators = self._generators(seed, len(feats))
        results: list[CaptionResult] = []
        for start in range(0, len(feats), self.image_batch):
            chunk = feats[start : start + self.image_batch]
            generator = (
                generators[start : start + self.image_batch]
                if isinstance(generators, list)
                else generators
            )
            for generated in self._generate(chunk, prompt_ids, search, generator):
                results.append(
                    CaptionResult(
                        [
                            self.tokenizer.decode(prompt_ids + c.tokens)[len(prompt) :]
                            for c in generated
                        ],
                        [len(c.tokens) for c in generated],
                        len(prompt_ids),
                        [c.finish_reason for c in generated],
                    )
                )
        return results

    def _generators(
        self, seed: int | Sequence[int] | None, images: int
    ) -> torch.Generator | list[torch.Generator] | None:
        """One stream for a call's seed, one per image for a list of seeds, or None."""
        if seed is None:
            return None
        if isinstance(seed, int):
            return torch.Generator(device=self.device).manual_seed(seed)
        if len(seed) != images:
            raise InvalidInputError(
                f"one seed per image: {len(seed)} seeds for {images} images", loc=("seed",)
            )
        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seed]

    def _generate(
        self,
        feats: Sequence[EncodedImage],
        prompt_ids: list[int],
        search: Search,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> list[list[Generated]]:
        with torch.inference_mode():
            tokens = torch.stack([f.tokens for f in feats]).to(self.device, self.compute_dtype)
            stepper = CachedStepper(self.model, self.model.cross_kv(tokens), search.max_length)
            prompt = torch.tensor([prompt_ids] * len(feats), device=self.device)  # [G, T0]
            if search.sample or search.num_beams == 1:
                return greedy_or_sample(stepper, prompt, search, generator)
            return beam_search(stepper, prompt, search)

    def close(self) -> None:
        self.images.close()
