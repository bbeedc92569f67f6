"""The public Python API: shapes, broadcasting, consistency between entry points, ranking rules,
input errors, and the image-feature cache."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipitm
from blipitm.engine.cache import ByteLRU, nbytes
from blipitm.processing import ResizedImage

# fp32 results of one input may differ in the last bits with the batch it is computed in: on
# AVX-512 CPUs oneDNN picks GEMM kernels by the batch's row count (1.6e-7 seen on tiny weights).
BATCH_ROUNDING = 1e-6
TEXTS = ["a dog on the grass", "a red car", "two people walking", "a cat", "the sky at night"]


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> blipitm.Engine:
    return blipitm.load(tiny_ckpt)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8))
        for i in range(4)
    ]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def count_calls(monkeypatch: pytest.MonkeyPatch, model: object, method: str) -> list[object]:
    """Make ``model.method`` a counting double of itself: each call appends its arguments to the
    returned list and runs the real method."""
    calls: list[object] = []
    real = getattr(model, method)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, method, counted)
    return calls


def test_score_shapes_and_consistency(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    pairs = engine.score(images, TEXTS[:4])
    assert pairs.itm_probability.shape == (4,) and pairs.itm_probability.dtype == np.float32
    assert pairs.itm_logits.shape == (4, 2) and pairs.itc_cosine.shape == (4,)
    m = engine.score_matrix(images, TEXTS)
    assert m.itm_logits.shape == (4, 5, 2) and m.shape == (4, 5)
    diag = np.arange(4)
    np.testing.assert_allclose(pairs.itm_logits, m.itm_logits[diag, diag], atol=1e-5)
    np.testing.assert_allclose(pairs.itc_cosine, m.itc_cosine[diag, diag], atol=1e-6)
    # probability is softmax(logits)[:, 1]
    z = m.itm_logits.astype(np.float64)
    want = np.exp(z[..., 1]) / np.exp(z).sum(-1)
    np.testing.assert_allclose(m.itm_probability, want, atol=1e-6)
    # cosine is the dot product of the unit-norm embeddings
    img_emb, txt_emb = engine.embed_images(images), engine.embed_texts(TEXTS)
    assert img_emb.shape == (4, 256) and txt_emb.shape == (5, 256)
    np.testing.assert_allclose(np.linalg.norm(img_emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt_emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(m.itc_cosine, img_emb @ txt_emb.T, atol=1e-6)


def test_itc_false_skips_only_the_cosine(
    engine: blipitm.Engine, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = engine.score_matrix(images, TEXTS)
    with monkeypatch.context() as patched:
        calls = count_calls(patched, engine.model, "text_embedding")
        for got in (
            engine.score_matrix(images, TEXTS, itc=False),
            engine.score(images, TEXTS[:4], itc=False),
            engine.score_pairs(images, TEXTS, [(0, 1), (2, 3)], itc=False),
        ):
            assert np.isnan(got.itc_cosine).all()
    assert calls == []  # the unimodal text pass never ran
    np.testing.assert_array_equal(
        engine.score_matrix(images, TEXTS, itc=False).itm_logits, full.itm_logits
    )


def test_broadcasting(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    one_image = engine.score(images[0], TEXTS)
    m = engine.score_matrix(images[:1], TEXTS)
    np.testing.assert_allclose(one_image.itm_logits, m.itm_logits[0], atol=1e-5)
    one_text = engine.score(images, TEXTS[1])
    m = engine.score_matrix(images, TEXTS[1:2])
    np.testing.assert_allclose(one_text.itm_logits, m.itm_logits[:, 0], atol=1e-5)
    assert len(engine.score([], [])) == 0
    with pytest.raises(blipitm.InvalidInputError, match="3 images and 2 texts"):
        engine.score(images[:3], TEXTS[:2])


def test_input_kinds_agree(
    engine: blipitm.Engine, images: list[Image.Image], tmp_path: Path
) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(images[1]))
    kinds = [images[1], np.asarray(images[1]), png_bytes(images[1]), path, str(path)]
    # Every kind decodes to the same pixels, exactly ...
    pixels = [engine.prepare_image(kind).pixels for kind in kinds]
    for p in pixels[1:]:
        np.testing.assert_array_equal(p, pixels[0])
    # ... and so to the same embedding, up to the rounding of the batch row it sits in.
    emb = engine.embed_images(kinds)
    for row in emb[1:]:
        np.testing.assert_allclose(row, emb[0], rtol=0, atol=BATCH_ROUNDING)


def test_rank_image_query_blip_rule(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    m = engine.score_matrix(images[:1], TEXTS)
    cos, logit1 = m.itc_cosine[0], m.itm_logits[0, :, 1]
    ranked = engine.rank_texts(images[0], TEXTS, rerank_k=3)
    kept = set(np.argsort(-cos)[:3].tolist())
    assert {r.index for r in ranked} == kept  # only the top rerank_k by cosine come back
    want = sorted(kept, key=lambda i: -(logit1[i] + cos[i]))
    assert [r.index for r in ranked] == want
    for r in ranked:
        assert r.score == pytest.approx(logit1[r.index] + cos[r.index], abs=1e-5)
        assert r.itm_probability == pytest.approx(m.itm_probability[0, r.index], abs=1e-5)
        assert r.itc_cosine == pytest.approx(cos[r.index], abs=1e-6)
    assert len(engine.rank_texts(images[0], TEXTS, top_k=2)) == 2


def test_rank_text_query(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    m = engine.score_matrix(images, TEXTS[:1])
    ranked = engine.rank_images(TEXTS[0], images, rerank_k=None)
    want = sorted(range(4), key=lambda i: -(m.itm_logits[i, 0, 1] + m.itc_cosine[i, 0]))
    assert [r.index for r in ranked] == want


def test_rank_direction_is_in_the_name(
    engine: blipitm.Engine, images: list[Image.Image], tmp_path: Path
) -> None:
    """A ``str`` image is a path in ``rank_texts`` exactly as in ``score`` (the README's old
    ``rank("dog.jpg", captions)`` read it as a caption), and no type-sniffing ``rank`` is left."""
    path = tmp_path / "dog.png"
    path.write_bytes(png_bytes(images[0]))
    ranked = engine.rank_texts(str(path), TEXTS, rerank_k=None)
    probability = engine.score(str(path), TEXTS).itm_probability
    assert sorted(r.index for r in ranked) == list(range(len(TEXTS)))
    for r in ranked:
        assert r.itm_probability == pytest.approx(probability[r.index], abs=1e-6)
    by_path = engine.rank_images(TEXTS[0], [images[1], str(path)], rerank_k=None)
    by_image = engine.rank_images(TEXTS[0], [images[1], images[0]], rerank_k=None)
    assert [r.index for r in by_path] == [r.index for r in by_image]
    assert [r.score for r in by_path] == pytest.approx([r.score for r in by_image], abs=1e-6)
    assert not hasattr(engine, "rank")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda e, ims: e.rank_texts(ims[0], "a dog"), "texts"),
        (lambda e, ims: e.rank_images("a dog", ims[0]), "images"),
        (lambda e, ims: e.rank_images(ims[0], ims[:2]), "text"),
    ],
)
def test_rank_refuses_a_single_candidate_or_a_swapped_query(
    engine: blipitm.Engine, images: list[Image.Image], call: Any, field: str
) -> None:
    with pytest.raises(blipitm.InvalidInputError) as info:
        call(engine, images)
    assert info.value.field == field


def test_rank_transformers_protocol_scores_probability(
    tiny_ckpt: Path, images: list[Image.Image]
) -> None:
    engine = blipitm.load(tiny_ckpt, protocol="transformers")
    ranked = engine.rank_texts(images[0], TEXTS, rerank_k=None)
    assert [r.score for r in ranked] == [r.itm_probability for r in ranked]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda e, ims: e.score([ims[0], 42], ["a", "b"]), "images[1]"),
        (lambda e, ims: e.score(ims[:2], ["a", None]), "texts[1]"),
        (lambda e, ims: e.score(ims[:2], ["a", b"\x00"]), "texts[1]"),
        (lambda e, ims: e.embed_texts(["a dog", ""]), "texts[1]"),
        (lambda e, ims: e.rank_texts(ims[0], ["a dog", ""]), "texts[1]"),
        (lambda e, ims: e.embed_images([b""]), "images[0]"),
        (lambda e, ims: e.embed_images([b"not an image"]), "images[0]"),
        (lambda e, ims: e.embed_images(["/does/not/exist.jpg"]), "images[0]"),
        (lambda e, ims: e.embed_images([np.zeros((4, 4, 3), np.float32)]), "images[0]"),
        (lambda e, ims: e.rank_texts(ims[0], ["ok", 3]), "texts[1]"),
        (lambda e, ims: e.rank_images("a dog", [ims[0], "/nope.png"]), "images[1]"),
    ],
)
def test_invalid_inputs_name_the_field(
    engine: blipitm.Engine, images: list[Image.Image], call: object, field: str
) -> None:
    with pytest.raises(blipitm.InvalidInputError) as info:
        call(engine, images)  # type: ignore[operator]
    assert info.value.field == field
    assert field in str(info.value)


def test_truncated_image_fails_cleanly(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    buf = io.BytesIO()
    images[2].resize((200, 200)).save(buf, format="JPEG")
    data = buf.getvalue()
    with pytest.raises(blipitm.InvalidInputError, match=r"images\[1\]"):
        engine.embed_images([images[0], data[: len(data) // 2]])
    engine.embed_images(images[:1])  # the engine is still usable


def test_pixel_limit(tiny_ckpt: Path, images: list[Image.Image]) -> None:
    engine = blipitm.load(tiny_ckpt, max_pixels=500)
    with pytest.raises(blipitm.ImageTooLargeError, match=r"images\[0\]"):
        engine.embed_images([images[3]])  # 51 x 45 pixels


def test_load_argument_errors(tiny_ckpt: Path) -> None:
    with pytest.raises(blipitm.InvalidInputError, match="protocol"):
        blipitm.load(tiny_ckpt, protocol="lavis")
    with pytest.raises(blipitm.InvalidInputError, match="dtype"):
        blipitm.load(tiny_ckpt, dtype="float16")  # CPU
    with pytest.raises(blipitm.InvalidInputError, match="device"):
        blipitm.load(tiny_ckpt, device="tpu9")


def test_overrides_reported(tiny_ckpt: Path) -> None:
    blip = blipitm.load(tiny_ckpt).info
    assert {o.field for o in blip.overrides} == {
        "text_config.num_attention_heads",
        "vision_config.layer_norm_eps",
    }
    heads = next(o for o in blip.overrides if o.field == "text_config.num_attention_heads")
    assert (heads.loaded, heads.used) == (4, 3)
    assert blip.as_dict()["overrides"][0]["field"]
    assert blipitm.load(tiny_ckpt, protocol="transformers").info.overrides == []


def test_cache_hits_give_identical_results(tiny_ckpt: Path, images: list[Image.Image]) -> None:
    engine = blipitm.load(tiny_ckpt)
    data = [png_bytes(im) for im in images]
    first = engine.score_matrix(data, TEXTS)
    assert engine.cache.stats.hits == 0
    second = engine.score_matrix(data, TEXTS)
    assert engine.cache.stats.hits == 2 * len(data)  # image tokens and cross-attention K/V
    np.testing.assert_array_equal(first.itm_logits, second.itm_logits)
    np.testing.assert_array_equal(first.itc_cosine, second.itc_cosine)
    uncached = blipitm.load(tiny_ckpt, cache_bytes=0)
    third = uncached.score_matrix(data, TEXTS)
    assert len(uncached.cache) == 0
    np.testing.assert_array_equal(first.itm_logits, third.itm_logits)
    np.testing.assert_array_equal(first.itc_cosine, third.itc_cosine)


def test_eviction_under_pressure_is_never_stale(tiny_ckpt: Path, images: list[Image.Image]) -> None:
    """A cache with room for about two images' entries, cycled through many images and pairings
    (stacked single pairs, per-image blocks, partial hits), always equals the uncached engine."""
    reference = blipitm.load(tiny_ckpt, cache_bytes=0)
    probe = blipitm.load(tiny_ckpt)
    probe.score(images[0], TEXTS[:2])  # one image's tokens and K/V, now in the cache
    kv_bytes = sum(nbytes(v) for k, v in probe.cache.entries() if k[0] == "kv")
    engine = blipitm.load(tiny_ckpt, cache_bytes=2 * kv_bytes)
    rng = np.random.default_rng(5)
    many = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(6)]
    for step in range(8):
        pick = [many[j] for j in rng.integers(0, len(many), 4)]
        texts = [TEXTS[j] for j in rng.integers(0, len(TEXTS), 4)]
        pairs = [(int(a), int(b)) for a, b in rng.integers(0, 4, (6, 2))]
        got = engine.score_pairs(pick, texts, pairs)
        want = reference.score_pairs(pick, texts, pairs)
        # A stale entry would be another image's K/V: far off, not a rounding apart.
        np.testing.assert_allclose(
            got.itm_logits, want.itm_logits, rtol=0, atol=BATCH_ROUNDING, err_msg=f"step {step}"
        )
        np.testing.assert_allclose(got.itc_cosine, want.itc_cosine, rtol=0, atol=BATCH_ROUNDING)
        assert engine.cache.bytes_used <= engine.cache.max_bytes
    assert engine.cache.stats.evictions > 0 and engine.cache.stats.hits > 0


def test_single_pairs_run_text_batch_to_a_pass_once_their_kv_is_cached(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many images with one text each: while their K/V is computed, ``images`` of them to a
    pass (bounds the K/V in memory); once it is cached, ``texts`` to a pass (no new memory, and
    text GEMMs of enough rows: BENCHMARKS.md, speed round three). Same numbers either way."""
    rng = np.random.default_rng(7)
    many = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(10)]
    engine = blipitm.load(tiny_ckpt, batch_sizes=blipitm.BatchSizes(images=3, texts=8))
    calls = count_calls(monkeypatch, engine.model, "itm_logits")
    cold = engine.score(many, TEXTS[1], itc=False)
    assert [c[0].shape[0] for c in calls] == [3, 3, 3, 1]  # type: ignore[index]
    calls.clear()
    warm = engine.score(many, TEXTS[1], itc=False)
    assert [c[0].shape[0] for c in calls] == [8, 2]  # type: ignore[index]
    reference = blipitm.load(tiny_ckpt, cache_bytes=0).score(many, TEXTS[1], itc=False)
    np.testing.assert_allclose(cold.itm_logits, reference.itm_logits, rtol=0, atol=BATCH_ROUNDING)
    np.testing.assert_allclose(warm.itm_logits, reference.itm_logits, rtol=0, atol=BATCH_ROUNDING)


def test_cached_kv_entry_is_one_block_per_image(tiny_ckpt: Path, images: list[Image.Image]) -> None:
    """An image's cached cross-attention K/V, cut from a batch's, is one allocation (per-layer
    views into it): 2 x layers small tensors per entry fragment the heap as entries churn
    (BENCHMARKS.md, dataset filtering)."""
    engine = blipitm.load(tiny_ckpt)
    engine.score_pairs(images[:3], TEXTS[:2], [(0, 0), (1, 1), (2, 0)])  # one K/V batch
    entries = [v for k, v in engine.cache.entries() if k[0] == "kv"]
    assert len(entries) == 3
    for entry in entries:
        tensors = [t for pair in entry for t in pair]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1
        assert tensors[0].untyped_storage().nbytes() == sum(t.nbytes for t in tensors)


def test_cache_byte_bound_and_eviction_never_stale() -> None:
    import torch

    cache = ByteLRU(max_bytes=1000)
    tensors = {k: torch.full((50,), float(k)) for k in range(10)}  # 200 bytes each
    for k, t in tensors.items():
        cache.put(k, t)
        assert cache.bytes_used <= 1000
    assert len(cache) == 5 and cache.stats.evictions == 5
    for k in range(10):
        got = cache.get(k)
        assert got is None or torch.equal(got, tensors[k])
    assert cache.get(0) is None and cache.get(9) is not None
    cache.put("big", torch.zeros(1000))  # larger than the budget: not cached, nothing evicted
    assert "big" not in cache and len(cache) == 5


def test_score_pairs_matches_matrix(engine: blipitm.Engine, images: list[Image.Image]) -> None:
    m = engine.score_matrix(images, TEXTS)
    pairs = [(0, 0), (0, 3), (2, 1), (3, 4), (1, 1), (0, 2)]
    rows, cols = np.array(pairs).T
    for source in (images, engine.encode_images(images)):
        got = engine.score_pairs(source, TEXTS, pairs)
        np.testing.assert_allclose(got.itm_logits, m.itm_logits[rows, cols], atol=1e-5)
        np.testing.assert_allclose(got.itc_cosine, m.itc_cosine[rows, cols], atol=1e-6)
    feats = engine.encode_images(images)
    half = feats.astype("float16")
    got = engine.score_pairs(half, TEXTS, pairs)  # stored half-precision features still score
    # float16 rounding of the tokens moves these logits by at most 3.8e-5 (measured); bfloat16
    # tokens would move them by 4.9e-4.
    np.testing.assert_allclose(got.itm_logits, m.itm_logits[rows, cols], atol=1e-4)
    np.testing.assert_allclose(got.itc_cosine, m.itc_cosine[rows, cols], atol=1e-6)
    with pytest.raises(blipitm.InvalidInputError, match="pairs"):
        engine.score_pairs(images, TEXTS, [(4, 0)])


def test_count_tokens_follows_the_protocol(tiny_ckpt: Path, engine: blipitm.Engine) -> None:
    long = " ".join(["dog"] * 50)
    assert engine.count_tokens(["a dog.", long]) == [4, 32]  # BLIP: 30 words + [CLS] [SEP]
    plain = blipitm.load(tiny_ckpt, protocol="transformers")
    assert plain.count_tokens(["a dog.", long]) == [5, 52]  # "." kept, no truncation


@pytest.mark.parametrize("protocol", ["blip", "transformers"])
def test_results_carry_the_token_counts_of_count_tokens(
    tiny_ckpt: Path, images: list[Image.Image], protocol: str
) -> None:
    """Every result counts its texts' tokens from the ids it scored, so usage needs no second
    tokenization: the counts equal count_tokens, truncation and caption cleanup included."""
    engine = blipitm.load(tiny_ckpt, protocol=protocol)  # type: ignore[arg-type]
    texts = [
        "a dog.",
        " ".join(["dog"] * 50),  # over 30 words: BLIP keeps 30
        "xqzvwk " * 10,  # 10 words of 6 word pieces each: BLIP truncates at 35 tokens
        "Two CATS on the grass!",
    ]
    want = engine.count_tokens(texts)
    assert want == ([4, 32, 35, 7] if protocol == "blip" else [5, 52, 62, 8])

    def counts(got: np.ndarray) -> list[int]:
        assert got.dtype == np.int64
        return got.tolist()

    encoded = engine.encode_texts(texts)
    assert counts(encoded.text_tokens) == want
    np.testing.assert_array_equal(encoded.embeddings, engine.embed_texts(texts))
    assert counts(engine.score(images[0], texts).text_tokens) == want
    assert counts(engine.score(images[:2], texts[0]).text_tokens) == want[:1]  # broadcast: once
    assert counts(engine.score_matrix(images[:2], texts).text_tokens) == want
    assert counts(engine.score_pairs(images[:2], texts, [(0, 3), (1, 3)]).text_tokens) == want
    assert counts(engine.score_pairs(images[:2], texts, []).text_tokens) == want
    ranked = engine.rank_texts(images[0], texts, rerank_k=2)
    assert len(ranked) == 2 and ranked.text_tokens == sum(want)  # every text read, not only kept
    assert engine.rank_images(texts[2], images, top_k=1).text_tokens == want[2]
    assert engine.rank_texts(images[0], []).text_tokens == 0


def test_decoding_overlaps_encoding_in_a_bounded_window(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = blipitm.load(tiny_ckpt, batch_sizes=blipitm.BatchSizes(images=2, texts=8))
    events: list[str] = []
    decode, encode = engine.images.decode, engine.model.encode_image

    def logged_decode(item: object, field: str) -> object:
        out = decode(item, field)
        events.append("d")
        return out

    def logged_encode(pixels: object) -> object:
        events.append("e")
        return encode(pixels)

    monkeypatch.setattr(engine.images, "decode", logged_decode)
    monkeypatch.setattr(engine.model, "encode_image", logged_encode)
    rng = np.random.default_rng(9)
    many = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(20)]
    engine.embed_images(many)
    assert events.count("d") == 20 and events.count("e") == 10
    window = max(2 * 2, 2 * engine.images.decode_threads)
    assert engine.images.prefetch_window == window
    for k in range(10):  # before the k-th batch is encoded, at most a window more are decoded
        before = events[: [i for i, e in enumerate(events) if e == "e"][k]]
        assert 2 * (k + 1) <= before.count("d") <= 2 * (k + 1) + window


def test_image_features_are_numpy_and_convert_as_torch_does(engine: blipitm.Engine) -> None:
    import torch

    feats = engine.encode_images([Image.new("RGB", (20, 30), (9, 99, 199))])
    assert isinstance(feats.tokens, np.ndarray) and feats.token_dtype == engine.info.compute_dtype
    assert feats.tokens.shape == (1, engine.info.image_tokens, engine.config.vision.hidden_size)
    x = torch.randn(4, 6, 8) * torch.logspace(-6, 4, 8)  # [4, 6, 8] float32, within float16
    f32 = blipitm.ImageFeatures(x.numpy(), np.zeros((4, 3), np.float32))
    bf16 = f32.astype("bfloat16")
    assert bf16.tokens.dtype == np.uint16  # numpy has no bfloat16: its bits
    want = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16.tokens, want)
    np.testing.assert_array_equal(bf16.astype("float32").tokens, x.bfloat16().float().numpy())
    np.testing.assert_array_equal(bf16.astype("float16").tokens, x.bfloat16().half().numpy())
    assert f32.astype("float32") is f32


def test_default_text_batch_follows_the_compute_dtype(tiny_ckpt: Path) -> None:
    """128 texts per batch where the CPU computes in bf16 (larger GEMMs for AMX), 32 in float32
    (measured: engine.default_batch_sizes)."""
    assert blipitm.load(tiny_ckpt).batch_sizes == blipitm.BatchSizes(images=8, texts=32)
    narrow = blipitm.load(tiny_ckpt, dtype="bfloat16", compute_dtype="bfloat16")
    assert narrow.batch_sizes == blipitm.BatchSizes(images=8, texts=128)


def test_prepare_image_decodes_once_under_the_engine_limits(
    tiny_ckpt: Path, images: list[Image.Image]
) -> None:
    """What a front end hands the engine as requests arrive: bytes decoded now, under the engine's
    pixel limit and decode budget; scoring the result reuses the bytes' cache entry."""
    engine = blipitm.load(tiny_ckpt, decode_budget_pixels=60 * 60)
    data = png_bytes(images[3])  # 51 x 45 pixels
    prepared = engine.prepare_image(data, ("input", 2))
    assert isinstance(prepared, ResizedImage) and prepared.protocol == engine.protocol
    assert engine.prepare_image(prepared) is prepared
    want = engine.embed_images([data])
    hits = engine.cache.stats.hits
    np.testing.assert_array_equal(engine.embed_images([prepared]), want)
    assert engine.cache.stats.hits == hits + 1  # no second decode or encode
    assert engine.decode_budget is not None and engine.decode_budget.in_use == 0
    big = png_bytes(images[3].resize((61, 60)))
    with pytest.raises(blipitm.ImageTooLargeError, match=r"input\[2\].*decode_budget_pixels"):
        engine.prepare_image(big, ("input", 2))
    with pytest.raises(blipitm.InvalidInputError) as info:
        engine.prepare_image(b"not an image")
    assert info.value.field == "image"
