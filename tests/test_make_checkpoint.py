"""The random test checkpoints are faithful to the real formats (checked against transformers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from blip_names import to_blip_names, training_extras
from blipitm.config import IMAGE_MEAN, IMAGE_STD, BlipConfig
from blipitm.testing.make_checkpoint import main, make_checkpoint, random_state_dict
from blipitm.testing.vocab import BERT_VOCAB_SIZE, make_vocab

CAPTIONS = [
    "a dog runs on the grass near a red car",
    "Two children are playing with a ball in the park.",
    "A woman in a blue dress is smiling at the camera!",
    "three men riding bikes down a busy city street",
    "a cat sleeping on a white couch next to the window",
]
HUB_FILES = {
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
}
SAVED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
}


def _hf_reference_shapes(config: BlipConfig) -> dict[str, tuple[int, ...]]:
    hf_config = transformers.BlipConfig.from_dict(config.to_hf_dict())
    with torch.device("meta"):  # shapes only: no memory even for the large preset
        model = transformers.BlipForImageTextRetrieval(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- files and layouts ------------------------------------------------------------------------


def test_hub_layout_files(tiny_ckpt: Path) -> None:
    assert {p.name for p in tiny_ckpt.iterdir()} == HUB_FILES
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config == {
        **BlipConfig.preset("tiny").to_hf_dict(),
        "dtype": "float32",
        "transformers_version": config["transformers_version"],
    }
    pre = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 48, "width": 48}
    assert pre["image_mean"] == list(IMAGE_MEAN) and pre["image_std"] == list(IMAGE_STD)
    assert pre["image_processor_type"] == "BlipImageProcessor"
    assert pre["processor_class"] == "BlipProcessor"
    assert pre["resample"] == 3 and pre["rescale_factor"] == 1 / 255
    tok_config = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert tok_config["do_lower_case"] is True and tok_config["model_max_length"] == 512
    assert tok_config["tokenizer_class"] == "BertTokenizer"


def test_saved_layout_files(tiny_ckpt: Path, tiny_ckpt_saved_layout: Path) -> None:
    assert {p.name for p in tiny_ckpt_saved_layout.iterdir()} == SAVED_FILES
    proc = json.loads((tiny_ckpt_saved_layout / "processor_config.json").read_text())
    hub = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    assert proc["processor_class"] == "BlipProcessor"
    assert proc["image_processor"] == {k: v for k, v in hub.items() if k != "processor_class"}
    same = load_file(tiny_ckpt / "model.safetensors")
    other = load_file(tiny_ckpt_saved_layout / "model.safetensors")
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)


def test_text_heads_sets_config_only(tmp_path: Path) -> None:
    out = make_checkpoint(tmp_path, preset="tiny", text_heads=3)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_attention_heads"] == 3


def test_rejects_unknown_format_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        make_checkpoint(tmp_path, fmt="onnx")
    with pytest.raises(ValueError, match="layout"):
        make_checkpoint(tmp_path, layout="zip")


# -- tensors ----------------------------------------------------------------------------------


def test_every_tensor_randomised(tiny_ckpt: Path) -> None:
    sd = load_file(tiny_ckpt / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == _hf_reference_shapes(
        BlipConfig.preset("tiny")
    )
    for name, t in sd.items():
        assert t.dtype == torch.float32, name
        # Nothing left at a default init value, not even one element.
        assert not (t == 0).any() and not (t == 1).any(), name
        assert t.unique().numel() > t.numel() // 2, name  # not a constant fill


def test_scales_by_role() -> None:
    sd = random_state_dict(BlipConfig.preset("tiny"), seed=0)
    ln_w = sd["text_encoder.encoder.layer.0.output.LayerNorm.weight"]
    assert abs(ln_w.mean() - 1) < 0.05 and 0.05 < ln_w.std() < 0.15
    qkv = sd["vision_model.encoder.layers.0.self_attn.qkv.weight"]  # 0.8/sqrt(128), capped 0.05
    assert abs(qkv.mean()) < 0.005 and 0.045 < qkv.std() < 0.055
    word = sd["text_encoder.embeddings.word_embeddings.weight"]
    assert 0.045 < word.std() < 0.055


def test_same_seed_same_values_other_seed_differs() -> None:
    config = BlipConfig.preset("tiny")
    a, b, c = (random_state_dict(config, s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_transformers_loads_every_tensor(tiny_ckpt: Path) -> None:
    model, info = transformers.BlipForImageTextRetrieval.from_pretrained(
        tiny_ckpt, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ours = load_file(tiny_ckpt / "model.safetensors")
    theirs = model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.config.text_config.num_attention_heads == 4


def test_forward_pass_is_healthy(tiny_ckpt: Path) -> None:
    """ITM probabilities informative (not saturated, not constant), cosines well inside (-1, 1)."""
    processor = transformers.BlipProcessor.from_pretrained(tiny_ckpt)
    model = transformers.BlipForImageTextRetrieval.from_pretrained(tiny_ckpt).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in CAPTIONS]
    inputs = processor(images=images, text=CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = model(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
        cos = model(**inputs, use_itm_head=False).itm_score.diagonal()
    assert torch.isfinite(itm).all() and torch.isfinite(cos).all()
    assert ((itm > 0.02) & (itm < 0.98)).all(), itm
    assert itm.std() > 1e-3, itm  # depends on the input
    assert (cos.abs() < 0.99).all(), cos


# -- vocabulary and tokenizer -----------------------------------------------------------------


def test_vocab_layout() -> None:
    vocab = make_vocab()
    assert len(vocab) == BERT_VOCAB_SIZE == len(set(vocab))
    assert vocab[0] == "[PAD]" and vocab[1] == "[unused0]" and vocab[99] == "[unused98]"
    assert vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "##s" in vocab and "##ing" in vocab and "é" in vocab and "##中" in vocab
    assert not vocab[-1].startswith("[")  # real tokens reach the last embedding row


def test_vocab_txt_has_exactly_30522_lines(tiny_ckpt: Path) -> None:
    lines = (tiny_ckpt / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines == make_vocab()


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_saved_layout"])
def test_transformers_tokenizer_loads(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    tok = transformers.BertTokenizerFast.from_pretrained(directory)
    # DESIGN gotcha: a wrongly built BertTokenizerFast silently has a 5-token vocabulary.
    assert len(tok) >= BERT_VOCAB_SIZE
    for caption in CAPTIONS:
        ids = tok(caption)["input_ids"]
        assert ids[0] == 101 and ids[-1] == 102
        assert 100 not in ids, (caption, tok.convert_ids_to_tokens(ids))
    assert tok("Café 中文 🙂")["input_ids"].count(100) == 0


def test_vocab_txt_alone_tokenizes_like_tokenizer_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_ckpt / name, tmp_path / name)
    from_json = transformers.BertTokenizerFast.from_pretrained(tiny_ckpt)
    from_vocab = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert len(from_vocab) >= BERT_VOCAB_SIZE
    texts = [*CAPTIONS, "Ünïcödé naïve café", "xyzzy qwerty", "日本の猫 🐶!", "  spaced\tout\n"]
    for text in texts:
        assert from_json(text)["input_ids"] == from_vocab(text)["input_ids"], text


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_saved_layout"])
def test_transformers_processor_loads(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    processor = transformers.BlipProcessor.from_pretrained(directory)
    out = processor(images=Image.new("RGB", (64, 40), (200, 30, 10)), return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 48, 48)
    assert len(processor.tokenizer) >= BERT_VOCAB_SIZE


# -- original .pth ----------------------------------------------------------------------------
# ``--format pth`` is a user tool built on the production key map; it is held here against BLIP's
# own names (tests/blip_names.py), which share nothing with that map.


def test_pth_has_blip_names_and_training_extras(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, preset="tiny", seed=0, fmt="pth")
    assert path.name == "model_retrieval.pth"
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"}
    sd = ckpt["model"]
    # The same values as the HF file of this seed, each under BLIP's name for that tensor.
    want = to_blip_names(random_state_dict(BlipConfig.preset("tiny"), seed=0))
    extras = training_extras(want, seed=0, queue_size=57)
    assert set(sd) == set(want) | set(extras)
    for name, tensor in want.items():
        assert torch.equal(sd[name], tensor), name
    for name, tensor in extras.items():
        assert (sd[name].shape, sd[name].dtype) == (tensor.shape, tensor.dtype), name
    assert sd["visual_encoder.pos_embed"].shape == (1, 10, 128)
    assert sd["image_queue"].shape == (256, 57) and sd["idx_queue"].dtype == torch.long
    assert sd["text_encoder.embeddings.position_ids"].shape == (1, 512)
    # Momentum copies differ from the weights they shadow, so loading the wrong one is visible.
    assert not torch.equal(
        sd["visual_encoder_m.blocks.0.attn.qkv.weight"],
        sd["visual_encoder.blocks.0.attn.qkv.weight"],
    )


# -- CLI and the base preset ------------------------------------------------------------------


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "a"), "--preset", "tiny", "--seed", "3", "--format", "pth"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "model_retrieval.pth")
    assert (
        main([str(tmp_path / "b"), "--seed", "3", "--layout", "saved", "--text-heads", "12"]) == 0
    )
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["text_config"]["num_attention_heads"] == 12
    assert (tmp_path / "b" / "processor_config.json").is_file()


def test_cli_module_entry_point(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blipitm.testing.make_checkpoint", str(tmp_path), "--seed", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_base_preset_matches_transformers(tmp_path: Path) -> None:
    """Base size (224M parameters, ~900 MB) is written directly, key for key like transformers."""
    out = make_checkpoint(tmp_path, preset="base", text_heads=8)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        fc2 = f.get_tensor("vision_model.encoder.layers.11.mlp.fc2.weight")  # floor 0.02
        qkv = f.get_tensor("text_encoder.encoder.layer.0.attention.self.query.weight")
    assert shapes == _hf_reference_shapes(BlipConfig.preset("base"))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 223_744_258
    assert 0.019 < fc2.std() < 0.021
    assert 0.028 < qkv.std() < 0.03  # 0.8 / sqrt(768)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_attention_heads"] == 8
    assert config["vision_config"]["image_size"] == 384
