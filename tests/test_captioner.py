"""BLIP's captioner against transformers' ``BlipForConditionalGeneration`` on the same random
weights (fp32): token-for-token captions (greedy, beam search, sampling with one seed),
per-step logits, the logits processors, the cached path against a plain one, the checkpoint
layouts, the CLI and the errors.

The reference is transformers as a user runs it (``from_pretrained``, ``BlipImageProcessorPil``,
``BertTokenizerFast``, ``generate``); it shares no code with blipitm.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
)
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import blipitm
from blip_names import write_blip_caption_pth
from blipitm.cli.main import main
from blipitm.engine.generation import (
    CachedStepper,
    PlainStepper,
    Search,
    beam_search,
    greedy_or_sample,
    repetition_penalty,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)
from blipitm.errors import CheckpointError, InvalidInputError
from blipitm.testing.make_checkpoint import make_checkpoint
from blipitm.testing.vocab import write_tokenizer_files

PROMPT = "a picture of "  # BLIP's, written here rather than imported
DEC = 30522  # the hub config's text_config.bos_token_id
SEP = 102
BASE_LOGIT_ATOL = 1e-5  # base size, fp32 (measured: see test_base_size_parity_in_both_layouts)


@pytest.fixture(scope="module")
def cap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cap"), preset="tiny", seed=5, task="caption")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 52 - 5 * i, 3), dtype=np.uint8))
        for i in range(3)
    ]


class Reference:
    def __init__(self, ckpt: Path, *, blip: bool = False) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        if blip:  # what protocol="blip" runs: head_dim 64, vision LayerNorm eps 1e-6
            cfg["text_config"]["num_attention_heads"] = cfg["text_config"]["hidden_size"] // 64
            cfg["vision_config"]["layer_norm_eps"] = 1e-6
        config = BlipConfig.from_dict(cfg)
        self.model = BlipForConditionalGeneration.from_pretrained(ckpt, config=config).eval()
        self.tokenizer = BertTokenizerFast.from_pretrained(ckpt)
        assert len(self.tokenizer) >= 30522
        size = config.vision_config.image_size
        self.processor = BlipImageProcessorPil(size={"height": size, "width": size})

    def generate(self, images: list[Image.Image], **kw: object) -> list[list[int]]:
        """Generated ids after the prompt, up to (not with) the first [SEP]."""
        return [ids for ids, _ in self.generate_ended(images, **kw)]

    def generate_ended(
        self, images: list[Image.Image], **kw: object
    ) -> list[tuple[list[int], str]]:
        """As :meth:`generate`, each with "stop" if transformers' sequence holds a [SEP] (it
        ended there), else "length"."""
        pixels = self.processor(images, return_tensors="pt").pixel_values
        text = self.tokenizer([PROMPT] * len(images), return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(
                pixel_values=pixels,
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                **kw,
            )
        prompt_len = text.input_ids.shape[1] - 1  # generate drops the trailing [SEP]
        rows = []
        for row in out.tolist():
            assert row[:prompt_len] == [DEC, *text.input_ids[0, 1:-1].tolist()]
            gen = row[prompt_len:]
            rows.append((gen[: gen.index(SEP)], "stop") if SEP in gen else (gen, "length"))
        return rows

    def caption(self, ids: list[int]) -> str:
        prompt = self.tokenizer(PROMPT).input_ids[1:-1]
        return self.tokenizer.decode([DEC, *prompt, *ids], skip_special_tokens=True)[len(PROMPT) :]


@pytest.fixture(scope="module")
def ref(cap_dir: Path) -> Reference:
    return Reference(cap_dir)


@pytest.fixture(scope="module")
def captioner(cap_dir: Path) -> blipitm.Captioner:
    return blipitm.load_captioner(cap_dir, protocol="transformers")


def _edited(cap_dir: Path, out: Path, edit: dict[str, object]) -> Path:
    """A copy of ``cap_dir`` with the named tensors multiplied (a number) or edited (a
    function of the tensor)."""
    import shutil

    shutil.copytree(cap_dir, out)
    weights = load_file(out / "model.safetensors")
    for name, how in edit.items():
        weights[name] = how(weights[name].clone()) if callable(how) else weights[name] * how
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def peaked(
    cap_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[blipitm.Captioner, Reference]:
    """The random weights spread next-token logits thinly (std ~0.15: top-k 50 keeps a nearly
    uniform set, and a temperature of 0.7 changes no draw). The LM head's LayerNorm scaled by 5
    makes them peaked (std ~0.75; top-p 0.9 keeps 25-39 of the 50, 6-30 at temperature 0.7)."""
    head_norm = "text_decoder.cls.predictions.transform.LayerNorm"
    ckpt = _edited(
        cap_dir,
        tmp_path_factory.mktemp("peaked") / "ckpt",
        {f"{head_norm}.weight": 5.0, f"{head_norm}.bias": 5.0},
    )
    return blipitm.load_captioner(ckpt, protocol="transformers"), Reference(ckpt)


@pytest.fixture(scope="module")
def eos_prone(
    cap_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[blipitm.Captioner, Reference]:
    """``cap_dir`` never produces [SEP] within 20 tokens on these images ([SEP] scores 1.2-4.2
    below the best token); with its LM bias raised by 2.0 some captions end with it and others
    run to max_length (greedy: images 0 and 2 run on, image 1 stops after 3 tokens; four beams:
    one of them stops exactly at max_length)."""

    def raise_sep(bias: torch.Tensor) -> torch.Tensor:
        bias[SEP] += 2.0
        return bias

    ckpt = _edited(
        cap_dir,
        tmp_path_factory.mktemp("eos") / "ckpt",
        {"text_decoder.cls.predictions.bias": raise_sep},
    )
    return blipitm.load_captioner(ckpt, protocol="transformers"), Reference(ckpt)


# -- parity ---------------------------------------------------------------------------------------


def _tokens_and_captions(
    captioner: blipitm.Captioner, images: list[Image.Image], **kw: object
) -> tuple[list[list[list[int]]], list[list[str]]]:
    seen: list[list[list[int]]] = []
    original = captioner._generate

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        seen.extend([c.tokens for c in image] for image in out)
        return out

    captioner._generate = spy  # type: ignore[method-assign]
    try:
        results = captioner.caption(images, **kw)  # type: ignore[arg-type]
    finally:
        del captioner._generate
    for tokens, result in zip(seen, results, strict=True):
        assert result.tokens == [len(t) for t in tokens]
        assert result.prompt_tokens == 4
    return seen, [r.captions for r in results]


@pytest.mark.parametrize(
    ("kw", "ref_kw"),
    [
        ({"num_beams": 1}, {"num_beams": 1}),
        ({}, {"num_beams": 3}),  # the default: 3 beams, 20 tokens after the prompt
        (
            {"num_beams": 3, "max_length": 12, "min_length": 9, "repetition_penalty": 1.3},
            {"num_beams": 3, "max_length": 12, "min_length": 9, "repetition_penalty": 1.3},
        ),
        (
            {"num_beams": 4, "num_captions": 2, "max_length": 10},
            {"num_beams": 4, "num_return_sequences": 2, "max_length": 10},
        ),
        ({"num_beams": 1, "repetition_penalty": 1.5}, {"num_beams": 1, "repetition_penalty": 1.5}),
    ],
    ids=["greedy", "beam-default", "beam-lengths-penalty", "beam-4-return-2", "greedy-penalty"],
)
def test_captions_match_transformers_token_for_token(
    captioner: blipitm.Captioner,
    ref: Reference,
    images: list[Image.Image],
    kw: dict[str, object],
    ref_kw: dict[str, object],
) -> None:
    tokens, captions = _tokens_and_captions(captioner, images, **kw)
    expected = ref.generate(images, **ref_kw)
    per_image = len(tokens[0])
    assert [t for image in tokens for t in image] == expected
    assert [c for image in captions for c in image] == [ref.caption(ids) for ids in expected]
    assert all(len(image) == per_image for image in tokens)


@pytest.mark.parametrize(
    ("kw", "ref_kw"),
    [
        ({"num_beams": 1}, {"num_beams": 1}),
        ({}, {"num_beams": 3}),
        (
            {"num_beams": 4, "num_captions": 2},
            {"num_beams": 4, "num_return_sequences": 2, "max_length": 24},
        ),
        ({"num_beams": 1, "max_length": 7}, {"num_beams": 1, "max_length": 7}),
    ],
    ids=["greedy", "beam-default", "beam-4-return-2", "greedy-cut"],
)
def test_finish_reasons_and_captions_that_end_with_sep_match_transformers(
    eos_prone: tuple[blipitm.Captioner, Reference],
    images: list[Image.Image],
    kw: dict[str, object],
    ref_kw: dict[str, object],
) -> None:
    """Captions that end with [SEP] (rows dropped, beams finished early) are transformers'
    tokens, and each caption's finish reason is what transformers' sequence shows: a [SEP]
    ("stop") or none before max_length ("length")."""
    captioner, ref = eos_prone
    tokens, captions = _tokens_and_captions(captioner, images, **kw)
    results = captioner.caption(images, **kw)  # type: ignore[arg-type]
    expected = ref.generate_ended(images, **ref_kw)
    assert [t for image in tokens for t in image] == [ids for ids, _ in expected]
    assert [c for image in captions for c in image] == [ref.caption(ids) for ids, _ in expected]
    assert [f for r in results for f in r.finish_reasons] == [f for _, f in expected]
    reasons = {reason for _, reason in expected}
    if kw.get("max_length") == 7:
        # Image 1's caption is its uncut 3 tokens, but [SEP] would come 4th: "length".
        assert results[1].tokens == [3] and results[1].finish_reasons == ["length"]
        assert reasons == {"length"}
    else:
        assert reasons == {"stop", "length"}  # both kinds occur, so the order is checked


def test_protocol_blip_matches_the_reconfigured_reference(
    cap_dir: Path, images: list[Image.Image]
) -> None:
    """protocol="blip" (the default) runs BLIP's head size and vision eps; so does the
    reference when configured that way."""
    captioner = blipitm.load_captioner(cap_dir)
    assert {o.field for o in captioner.info.overrides} == {
        "text_config.num_attention_heads",
        "vision_config.layer_norm_eps",
    }
    tokens, _ = _tokens_and_captions(captioner, images[:2], max_length=14)
    assert [t for image in tokens for t in image] == Reference(cap_dir, blip=True).generate(
        images[:2], num_beams=3, max_length=14
    )


@pytest.mark.parametrize(
    ("which", "kw"),
    [
        ("flat", {}),
        ("peaked", {}),
        ("peaked", {"temperature": 0.7}),
    ],
    ids=["blip-nucleus", "blip-nucleus-peaked", "temperature-0.7-peaked"],
)
def test_sampling_matches_transformers_with_the_same_seed(
    request: pytest.FixtureRequest,
    images: list[Image.Image],
    which: str,
    kw: dict[str, object],
) -> None:
    """One image, so that no row finishes early and both draw the same random stream: BLIP's
    nucleus sampling (top_p 0.9, repetition penalty 1.1) with transformers' top-k 50, and a
    temperature (transformers divides after the penalty, before top-k and top-p). On the
    "peaked" checkpoint the nucleus holds a few to ~40 tokens, so each of them changes draws."""
    captioner, ref = (
        (request.getfixturevalue("captioner"), request.getfixturevalue("ref"))
        if which == "flat"
        else request.getfixturevalue("peaked")
    )
    tokens, _ = _tokens_and_captions(
        captioner, images[:1], sample=True, seed=11, max_length=12, **kw
    )
    torch.manual_seed(11)
    expected = ref.generate(
        images[:1], do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=12, **kw
    )
    assert tokens[0] == expected
    if "temperature" in kw:  # the setting is one where the temperature matters
        untempered, _ = _tokens_and_captions(
            captioner, images[:1], sample=True, seed=11, max_length=12
        )
        assert untempered != tokens


def test_teacher_forced_logits_match_per_step(
    captioner: blipitm.Captioner, ref: Reference, images: list[Image.Image]
) -> None:
    caption_ids = [1037, 3899, 2006, 1996, 5568, 102]  # any ids; [SEP] last
    prompt = captioner.prompt_ids()
    ids = torch.tensor([[*prompt, *caption_ids]] * 2)
    pixels = ref.processor(images[:2], return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = ref.model(pixel_values=pixels, input_ids=ids).logits  # [2, T, V]
    feats = captioner.images.features(images[:2], loc=("images",))
    model = captioner.model
    with torch.inference_mode():
        tokens = torch.stack([f.tokens for f in feats])
        cache = model.new_cache(2, ids.shape[1], dtype=torch.float32, device=torch.device("cpu"))
        got = model.decode(ids, cache, model.cross_kv(tokens), [1, 1], last_only=False)
        # The same positions one token at a time through the cache.
        cache = model.new_cache(2, ids.shape[1], dtype=torch.float32, device=torch.device("cpu"))
        kv = model.cross_kv(tokens)
        steps = [model.decode(ids[:, :4], cache, kv, [1, 1])]
        steps += [
            model.decode(ids[:, t : t + 1], cache, kv, [1, 1]) for t in range(4, ids.shape[1])
        ]
    err = (got - expected).abs().max().item()
    assert err < 1e-5, err
    stepped = torch.stack(steps, dim=1)  # positions 3.. of the sequence
    err_steps = (stepped - expected[:, 3:]).abs().max().item()
    assert err_steps < 1e-5, err_steps


@pytest.fixture(scope="module")
def base_caption(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One random captioner of the real base shapes (ViT-B/16 at 384, BERT-base decoder, 12
    heads) in both layouts: the hub directory, and the same tensors as BLIP's ``.pth`` (named from
    tests/blip_names.py's hand-written table, not blipitm's key map). Written once per session
    under the session's base temp dir, as test_dtypes.py's base checkpoint."""
    root = Path(tmp_path_factory.getbasetemp()) / "base-caption"
    hub = root / "hub"
    pth = root / "pth" / "model_base_caption_capfilt_large.pth"
    if not (hub / "config.json").exists():
        make_checkpoint(hub, preset="base", seed=13, task="caption")
    if not pth.exists():
        pth.parent.mkdir(parents=True, exist_ok=True)
        write_tokenizer_files(pth.parent)
        write_blip_caption_pth(load_file(hub / "model.safetensors"), pth)
    return hub, pth


@pytest.mark.slow
def test_base_size_parity_in_both_layouts(
    base_caption: tuple[Path, Path], images: list[Image.Image]
) -> None:
    """Base size, both layouts, protocol "blip" (the default, and the only one a .pth has):
    greedy and beam-3 captions token for token, and teacher-forced logits at every position,
    against transformers configured as BLIP runs (head size 64, vision eps 1e-6).

    The random 12-layer decoder ranks one token first at every position for every image (by
    0.4-0.7 over the second, though logits differ by up to 0.85 between images), so both
    searches run with a repetition penalty of 1.3: the tokens then differ by step and image."""
    hub, pth = base_caption
    ims = images[:1]  # batching is the tiny tests' business; one image keeps this ~1/3 cheaper
    search = {"max_length": 12, "repetition_penalty": 1.3}
    ref = Reference(hub, blip=True)
    want_greedy = ref.generate(ims, num_beams=1, **search)
    want_beam = ref.generate(ims, num_beams=3, **search)
    assert len({t for ids in want_greedy + want_beam for t in ids}) > 5
    ids = torch.tensor([[DEC, 1037, 3861, 1997, 1037, 3899, 2006, 1996, 5568, SEP]] * len(ims))
    pixels = ref.processor(ims, return_tensors="pt").pixel_values
    with torch.no_grad():
        want_logits = ref.model(pixel_values=pixels, input_ids=ids).logits  # [2, T, V]
    del ref
    for source in (hub, pth):
        captioner = blipitm.load_captioner(source)
        greedy, _ = _tokens_and_captions(captioner, ims, num_beams=1, **search)  # type: ignore[arg-type]
        beam, _ = _tokens_and_captions(captioner, ims, num_beams=3, **search)  # type: ignore[arg-type]
        assert [t for image in greedy for t in image] == want_greedy, source
        assert [t for image in beam for t in image] == want_beam, source
        model = captioner.model
        with torch.inference_mode():
            tokens = torch.stack(
                [f.tokens for f in captioner.images.features(ims, loc=("images",))]
            )
            cache = model.new_cache(
                len(ims), ids.shape[1], dtype=tokens.dtype, device=tokens.device
            )
            kv = model.cross_kv(tokens)
            got = model.decode(ids, cache, kv, [1] * len(ims), last_only=False)
        assert got.shape == want_logits.shape
        err = (got - want_logits).abs().max().item()
        print(f"\n{source.name}: teacher-forced logits max |err| {err:.2e}")
        assert err < BASE_LOGIT_ATOL, (source, err)
        del captioner, model


# -- the parts ------------------------------------------------------------------------------------


def test_top_p_filter_on_a_fixed_distribution() -> None:
    """p = (0.5, 0.3, 0.15, 0.05): the smallest set of most probable tokens whose mass reaches
    top_p survives."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {
        p: (top_p_filter(logits, p)[0] > -float("inf")).nonzero()[:, 0].tolist()
        for p in (0.4, 0.75, 0.9, 0.97, 1.0)
    }
    assert kept == {0.4: [0], 0.75: [0, 1], 0.9: [0, 1, 2], 0.97: [0, 1, 2, 3], 1.0: [0, 1, 2, 3]}
    shuffled = logits[:, [2, 0, 3, 1]]  # the filter keys on values, not positions
    assert (top_p_filter(shuffled, 0.75)[0] > -float("inf")).tolist() == [False, True, False, True]


def test_logits_processors_equal_transformers() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 300, generator=g) * 3
    seqs = torch.randint(0, 300, (5, 7), generator=g)
    assert torch.equal(
        repetition_penalty(scores, seqs, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(seqs, scores)
    )
    assert torch.equal(top_k_filter(scores, 50), TopKLogitsWarper(50)(seqs, scores))
    for t in (0.7, 1.3):
        assert torch.equal(temperature_scale(scores, t), TemperatureLogitsWarper(t)(seqs, scores))
    for p in (0.3, 0.9):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(seqs, scores))


def test_cached_path_equals_the_plain_path(
    captioner: blipitm.Captioner, images: list[Image.Image]
) -> None:
    """Cross-attention K/V once per image and the self-attention cache give the tokens a path
    that recomputes everything at every step gives."""
    model = captioner.model
    feats = captioner.images.features(images, loc=("images",))
    tokens = torch.stack([f.tokens for f in feats])
    prompt = torch.tensor([captioner.prompt_ids()] * len(images))
    searches = [
        (Search(max_length=11, num_beams=3, num_return=2), beam_search),
        (Search(max_length=11, min_length=8), greedy_or_sample),
        (Search(max_length=11, sample=True, top_p=0.9, top_k=50, num_return=2), greedy_or_sample),
    ]
    with torch.inference_mode():
        for search, run in searches:
            args = [search] + ([torch.Generator()] if search.sample else [])
            if search.sample:
                args[1].manual_seed(3)  # type: ignore[attr-defined]
            cached = run(CachedStepper(model, model.cross_kv(tokens), 11), prompt, *args)
            if search.sample:
                args[1].manual_seed(3)  # type: ignore[attr-defined]
            plain = run(PlainStepper(model, tokens), prompt, *args)
            assert cached == plain, search


def test_sampling_is_reproducible_with_a_seed(
    captioner: blipitm.Captioner, images: list[Image.Image]
) -> None:
    a = captioner.caption(images[:2], sample=True, seed=1, num_captions=3, max_length=10)
    b = captioner.caption(images[:2], sample=True, seed=1, num_captions=3, max_length=10)
    c = captioner.caption(images[:2], sample=True, seed=2, num_captions=3, max_length=10)
    assert a == b and a != c
    assert [len(r.captions) for r in a] == [3, 3]


def test_one_seed_per_image_draws_as_the_image_alone(
    captioner: blipitm.Captioner, images: list[Image.Image]
) -> None:
    """A list of seeds gives each image its own stream: in a batch of three, each image's
    captions are those it draws alone (CapFilt's per-sample seeds), whatever the batch."""
    kw: dict[str, Any] = {"sample": True, "num_captions": 2, "max_length": 10}
    batched = captioner.caption(images, seed=[5, 6, 7], **kw)
    alone = [
        captioner.caption(im, seed=s, **kw)[0] for im, s in zip(images, (5, 6, 7), strict=True)
    ]
    assert batched == alone
    assert captioner.caption(images[::-1], seed=[7, 6, 5], **kw) == alone[::-1]
    with pytest.raises(InvalidInputError, match="seed: one seed per image: 2 seeds for 3"):
        captioner.caption(images, seed=[1, 2], **kw)


def test_decode_batches_are_larger_than_encode_batches_and_change_nothing(
    cap_dir: Path, images: list[Image.Image]
) -> None:
    """By default the decoder takes 16 images a call on a CPU and the vision tower the engine's 8
    (the decoder's GEMMs have few rows: BENCHMARKS.md, speed round three); an image's captions
    are the same whatever the decode batch, beams included."""
    default = blipitm.load_captioner(cap_dir, protocol="transformers")
    assert (default.image_batch, default.images.batch_size) == (16, 8)
    one = blipitm.load_captioner(
        cap_dir, protocol="transformers", batch_sizes=blipitm.BatchSizes(images=1, texts=1)
    )
    assert (one.image_batch, one.images.batch_size) == (1, 1)
    for kw in ({"num_beams": 1}, {"num_beams": 3, "num_captions": 2}):
        assert default.caption(images, max_length=10, **kw) == one.caption(
            images, max_length=10, **kw
        ), kw


class ForcedSep:
    """A fake stepper: every row of image ``g`` gets token 7 as the clear best choice at each
    step, except at step ``sep_at[g]`` (0: the first generated token), where [SEP] is."""

    VOCAB = 128

    def __init__(self, sep_at: list[int]) -> None:
        self.sep_at = torch.tensor(sep_at)
        self.step = 0
        self.images = torch.zeros(0, dtype=torch.long)

    def start(self, ids: torch.Tensor, rows_per_image: list[int]) -> torch.Tensor:
        self.images = torch.repeat_interleave(torch.tensor(rows_per_image))
        return self._logits()

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.images = self.images[keep]
        self.step += 1
        return self._logits()

    def _logits(self) -> torch.Tensor:
        logits = torch.full((len(self.images), self.VOCAB), -30.0)
        now = self.sep_at[self.images] == self.step
        logits[:, 7] = torch.where(now, -30.0, 0.0)
        logits[:, SEP] = torch.where(now, 0.0, -60.0)
        return logits


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_finish_reason_is_what_the_search_did(mode: str) -> None:
    """max_length 10 after a 4-token prompt: 6 steps (0-5). [SEP] at step 0 (an empty caption),
    2, exactly the last step 5 (still "stop": the caption ended with [SEP]), and never."""
    sep_at = [0, 2, 5, 99]
    search = Search(
        max_length=10,
        num_beams=3 if mode == "beam" else 1,
        sample=mode == "sample",
        num_return=2 if mode == "sample" else 1,
    )
    prompt = torch.tensor([[DEC, 1037, 3861, 1997]] * len(sep_at))
    stepper = ForcedSep(sep_at)
    if mode == "beam":
        out = beam_search(stepper, prompt, search)
    else:
        out = greedy_or_sample(stepper, prompt, search, torch.Generator().manual_seed(0))
    per_image = search.num_return
    assert [[c.finish_reason for c in image] for image in out] == [
        [r] * per_image for r in ("stop", "stop", "stop", "length")
    ]
    assert [[c.tokens for c in image] for image in out] == [
        [[7] * n] * per_image for n in (0, 2, 5, 6)
    ]


# -- checkpoints ----------------------------------------------------------------------------------


def test_tied_copies_and_pth_layout_load_the_same_weights(
    cap_dir: Path, tmp_path: Path, images: list[Image.Image]
) -> None:
    """The hub's transformers-4 file carries the LM head's tied copies; BLIP's .pth carries them
    with original vision names (config inferred: BLIP's head size and eps, as protocol="blip")."""
    tied = make_checkpoint(
        tmp_path / "tied", preset="tiny", seed=5, task="caption", tied_copies=True
    )
    assert "text_decoder.cls.predictions.decoder.weight" in load_file(tied / "model.safetensors")
    pth = make_checkpoint(tmp_path / "pth", preset="tiny", seed=5, task="caption", fmt="pth")
    want = blipitm.load_captioner(cap_dir).caption(images[0], max_length=8)
    assert blipitm.load_captioner(tied).caption(images[0], max_length=8) == want
    assert blipitm.load_captioner(pth).caption(images[0], max_length=8) == want


def test_a_bad_checkpoint_fails_clearly(cap_dir: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cap_dir, bad)
    weights = load_file(bad / "model.safetensors")
    weights["text_decoder.cls.predictions.decoder.weight"] = torch.zeros_like(
        weights["text_decoder.bert.embeddings.word_embeddings.weight"]
    )
    del weights["text_decoder.cls.predictions.transform.dense.bias"]
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="different from"):
        blipitm.load_captioner(bad)
    del weights["text_decoder.cls.predictions.decoder.weight"]
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*transform\.dense\.bias"):
        blipitm.load_captioner(bad)
    with pytest.raises(CheckpointError, match="not a captioner"):
        blipitm.load_captioner(tiny_ckpt)
    with pytest.raises(CheckpointError, match="load_captioner"):
        blipitm.load(cap_dir)


# -- inputs, errors, CLI --------------------------------------------------------------------------


def test_bad_inputs_name_what_is_wrong(
    captioner: blipitm.Captioner, images: list[Image.Image]
) -> None:
    with pytest.raises(InvalidInputError, match=r"images\[1\]"):
        captioner.caption([images[0], b"not an image"])
    for kw, where in [
        ({"num_beams": 0}, "num_beams"),
        ({"max_length": 4}, "max_length"),  # the prompt's 4 tokens fill it
        ({"num_beams": 2, "num_captions": 3}, "num_captions"),
        ({"sample": True, "num_beams": 3}, "num_beams"),
        ({"min_length": 30, "max_length": 10}, "min_length"),
        ({"sample": True, "top_p": 0.0}, "top_p"),
        ({"sample": True, "temperature": 0.0}, "temperature"),
        ({"sample": True, "temperature": -1.0}, "temperature"),
        ({"sample": True, "temperature": float("nan")}, "temperature"),
        ({"sample": True, "temperature": float("inf")}, "temperature"),
        ({"temperature": 0.0}, "temperature"),  # checked even when not sampling
    ]:
        with pytest.raises(InvalidInputError) as info:
            captioner.caption(images[0], **kw)  # type: ignore[arg-type]
        assert info.value.field == where, kw
    with pytest.raises(InvalidInputError, match="no room for a caption"):
        captioner.caption(images[0], max_length=4)


def test_cli_json_lines(
    cap_dir: Path, tmp_path: Path, images: list[Image.Image], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    argv = ["caption", *paths, "--model", str(cap_dir), "--protocol", "transformers"]
    assert (
        main([*argv, "--json", "--num-beams", "3", "--num-captions", "2", "--max-length", "9"]) == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = blipitm.load_captioner(cap_dir, protocol="transformers").caption(
        images[:2], num_captions=2, max_length=9
    )
    assert lines == [
        {"image": p, "captions": r.captions, "finish_reasons": r.finish_reasons}
        for p, r in zip(paths, expected, strict=True)
    ]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert main(["caption", paths[0], str(broken), "--model", str(cap_dir)]) == 2
    assert "images[1]" in capsys.readouterr().err
    assert main([*argv, "--num-beams", "0"]) == 2
    assert "--num-beams" in capsys.readouterr().err
    assert main([*argv, "--sample", "--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_cli_defaults_equal_the_library_defaults() -> None:
    from blipitm.cli import caption as cli
    from blipitm.engine import captioner as lib

    assert (cli.NUM_BEAMS, cli.NEW_TOKENS, cli.TOP_P) == (
        lib.DEFAULT_NUM_BEAMS,
        lib.DEFAULT_NEW_TOKENS,
        lib.DEFAULT_TOP_P,
    )


def test_images_accepted_like_the_engine(
    captioner: blipitm.Captioner, images: list[Image.Image], tmp_path: Path
) -> None:
    path = tmp_path / "i.png"
    images[0].save(path)
    data = path.read_bytes()
    forms = [images[0], str(path), path, data, np.asarray(Image.open(io.BytesIO(data)))]
    results = captioner.caption(forms, max_length=8)
    assert all(r == results[0] for r in results)
    assert captioner.caption(images[0], max_length=8) == results[:1]
