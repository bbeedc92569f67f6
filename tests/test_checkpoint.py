"""checkpoint/: key map, strict loading with one full report, resolving local/.pth/hub sources."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client
import pytest
import torch
import transformers
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from blip_names import to_blip_names
from blipitm.checkpoint import (
    DROPPED_KEY_PATTERNS,
    VISION_KEY_MAP,
    check_state_dict,
    config_from_original,
    convert_to_hf,
    expected_shapes,
    hf_from_original,
    is_dropped,
    load_into,
    load_weights,
    original_from_hf,
    read_state_dict,
    resolve,
)
from blipitm.config import BLIP_VISION_LN_EPS, BlipConfig
from blipitm.errors import CheckpointError, HubUnavailableError
from blipitm.testing.make_checkpoint import make_checkpoint

# The module, not the function of the same name that blipitm.checkpoint re-exports.
resolve_module = importlib.import_module("blipitm.checkpoint.resolve")

REPO = "Salesforce/blip-itm-base-flickr"
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def _blip_config(config: BlipConfig) -> BlipConfig:
    """What inference from shapes gives: head_dim 64 in both towers, the original eps."""
    return dataclasses.replace(
        config,
        vision=dataclasses.replace(
            config.vision,
            num_attention_heads=config.vision.hidden_size // 64,
            layer_norm_eps=BLIP_VISION_LN_EPS,
        ),
        text=dataclasses.replace(config.text, num_attention_heads=config.text.hidden_size // 64),
    )


def _meta_state_dict(config: BlipConfig) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in expected_shapes(config).items()}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in skip])
    return dst


# -- expected tensors and key map -------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_expected_shapes_equal_transformers(preset: str) -> None:
    config = BlipConfig.preset(preset)
    hf_config = transformers.BlipConfig.from_dict(config.to_hf_dict())
    with torch.device("meta"):  # no memory, even for large
        model = transformers.BlipForImageTextRetrieval(hf_config)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = expected_shapes(config)
    assert list(ours) == list(reference)  # same names, same order
    assert ours == reference


def test_expected_shapes_ignore_head_counts() -> None:
    assert expected_shapes(BlipConfig.preset("base", text_heads=8)) == expected_shapes(
        BlipConfig.preset("base")
    )


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_key_map_matches_blip_names(preset: str) -> None:
    """Each BLIP name loads as the Hugging Face name of the same tensor, and back (the truth is the
    hand-written table in tests/blip_names.py, not the map under test)."""
    hf_names = list(expected_shapes(BlipConfig.preset(preset)))
    blip_names = to_blip_names({k: k for k in hf_names})  # BLIP name -> HF name it must become
    assert hf_from_original(blip_names) == {k: k for k in hf_names}
    assert original_from_hf({hf: blip for blip, hf in blip_names.items()}) == {
        blip: blip for blip in blip_names
    }


def test_blip_training_tensors_are_dropped(tiny_pth: Path) -> None:
    sd = torch.load(tiny_pth, weights_only=True)["model"]
    assert "visual_encoder_m.blocks.0.norm1.weight" in sd and "image_queue" in sd
    assert set(hf_from_original(sd)) == set(expected_shapes(BlipConfig.preset("tiny")))


def test_key_map_is_data() -> None:
    assert ("visual_encoder.norm.", "vision_model.post_layernorm.") in VISION_KEY_MAP
    assert len(VISION_KEY_MAP) == 9 and len(DROPPED_KEY_PATTERNS) == 10


@pytest.mark.parametrize(
    "key",
    [
        "visual_encoder_m.blocks.3.attn.qkv.weight",
        "text_encoder_m.embeddings.word_embeddings.weight",
        "vision_proj_m.weight",
        "text_proj_m.bias",
        "image_queue",
        "text_queue",
        "idx_queue",
        "ptr_queue",
        "temp",
        "text_encoder.embeddings.position_ids",
        "vision_model.embeddings.position_ids",
    ],
)
def test_training_only_keys_are_dropped(key: str) -> None:
    assert is_dropped(key)
    assert hf_from_original({key: torch.zeros(1), "itm_head.bias": torch.ones(2)}).keys() == {
        "itm_head.bias"
    }


@pytest.mark.parametrize(
    "key", ["itm_head.weight", "text_proj.weight", "visual_encoder.blocks.0.mlp.fc1.weight"]
)
def test_weights_are_not_dropped(key: str) -> None:
    assert not is_dropped(key)


def test_two_spellings_of_one_tensor_are_refused() -> None:
    sd = {"visual_encoder.norm.weight": torch.ones(2), "vision_model.post_layernorm.weight": 1}
    with pytest.raises(CheckpointError, match="post_layernorm"):
        hf_from_original(sd)


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
@pytest.mark.parametrize("names", ["original", "hf"])
def test_config_from_original_infers_any_size(preset: str, names: str) -> None:
    config = BlipConfig.preset(preset)
    sd = _meta_state_dict(config)
    if names == "original":
        sd = to_blip_names(sd) | {"temp": torch.tensor(0.07), "image_queue": torch.zeros(2, 3)}
    assert config_from_original(sd) == _blip_config(config)


def test_config_from_original_base_and_large_heads() -> None:
    base = config_from_original(to_blip_names(_meta_state_dict(BlipConfig.preset("base"))))
    large = config_from_original(to_blip_names(_meta_state_dict(BlipConfig.preset("large"))))
    assert (base.vision.num_attention_heads, base.text.num_attention_heads) == (12, 12)
    assert (large.vision.num_attention_heads, large.text.num_attention_heads) == (16, 12)
    assert large.text.encoder_hidden_size == 1024 and large.vision.num_hidden_layers == 24
    assert base.vision.layer_norm_eps == 1e-6 and base.text.layer_norm_eps == 1e-12


def test_config_from_original_names_the_missing_tensor() -> None:
    sd = to_blip_names(_meta_state_dict(BlipConfig.preset("tiny")))
    del sd["visual_encoder.cls_token"]
    with pytest.raises(CheckpointError, match=r"visual_encoder|class_embedding"):
        config_from_original(sd)


# -- reading files ----------------------------------------------------------------------------


def test_read_state_dict_unwraps(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(3, 2)}
    for i, wrapped in enumerate([sd, {"model": sd}, {"state_dict": sd}]):
        path = tmp_path / f"w{i}.pth"
        torch.save(wrapped, path)
        _assert_same(read_state_dict(path), sd)
    legacy = tmp_path / "legacy.bin"
    torch.save({"model": sd}, legacy, _use_new_zipfile_serialization=False)  # no mmap possible
    _assert_same(read_state_dict(legacy), sd)


def test_sharded_safetensors(tiny_ckpt: Path, tmp_path: Path) -> None:
    sd = _weights(tiny_ckpt)
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt", skip=("model.safetensors",))
    keys = list(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[:40],
        "model-00002-of-00002.safetensors": keys[40:],
    }
    for name, names in shards.items():
        save_file({k: sd[k] for k in names}, directory / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same(read_state_dict(directory / "model.safetensors.index.json"), sd)
    r = resolve(directory)
    assert r.weights_path.name == "model.safetensors.index.json"
    _assert_same(load_weights(r), sd)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_weights(r)


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _flip_header(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("damage", [_truncate, _flip_header])
def test_damaged_safetensors(
    tiny_ckpt: Path, tmp_path: Path, damage: Callable[[Path, Path], Path]
) -> None:
    path = damage(tiny_ckpt / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        read_state_dict(path)


@pytest.mark.parametrize("damage", [_truncate, _flip_header])
def test_damaged_pth(tiny_pth: Path, tmp_path: Path, damage: Callable[[Path, Path], Path]) -> None:
    path = damage(tiny_pth, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        read_state_dict(path)


def test_damaged_file_surfaces_through_load_weights(tiny_ckpt: Path, tmp_path: Path) -> None:
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt")
    _truncate(tiny_ckpt / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(resolve(directory))


@pytest.mark.parametrize("name", ["notes.pth", "notes.safetensors", "notes.bin"])
def test_text_file_is_not_a_checkpoint(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("these are my notes, not weights\n" * 20)
    with pytest.raises(CheckpointError, match="not"):
        read_state_dict(path)


def test_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "when": datetime.datetime(2024, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle arbitrary objects"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"epoch": 3, "lr": 0.1}, "without tensors"),
        (torch.ones(3), "not a state dict"),
        ({"w": torch.ones(1), "step": 7}, "not tensors: 'step'"),
    ],
)
def test_not_a_state_dict(tmp_path: Path, obj: object, match: str) -> None:
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


# -- strict checking --------------------------------------------------------------------------


def test_check_accepts_exact_match(tiny_ckpt: Path) -> None:
    check_state_dict(_weights(tiny_ckpt), BlipConfig.preset("tiny"))


def test_one_error_lists_missing_unexpected_and_misshaped(tiny_ckpt: Path, tmp_path: Path) -> None:
    sd = _weights(tiny_ckpt)
    del sd["text_encoder.encoder.layer.1.output.LayerNorm.bias"]
    sd["text_encoder.pooler.dense.weight"] = torch.randn(192, 192)
    sd["itm_head.weight"] = torch.randn(3, 192)
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt")
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_weights(resolve(directory))
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "text_encoder.encoder.layer.1.output.LayerNorm.bias: expected (192,)" in message
    assert "text_encoder.pooler.dense.weight: shape (192, 192)" in message
    assert "itm_head.weight: expected (2, 192), got (3, 192)" in message


def test_long_reports_are_limited(tiny_ckpt: Path) -> None:
    sd = {k: v for k, v in _weights(tiny_ckpt).items() if not k.startswith("text_encoder.")}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(sd, BlipConfig.preset("tiny"))
    message = str(info.value)
    n_text = sum(k.startswith("text_encoder.") for k in expected_shapes(BlipConfig.preset("tiny")))
    assert f"missing tensors ({n_text}):" in message
    assert f"... and {n_text - 20} more" in message
    assert len(message.splitlines()) < 30


def test_nan_weights_are_corrupted(tiny_ckpt: Path, tmp_path: Path) -> None:
    sd = _weights(tiny_ckpt)
    sd["vision_proj.weight"][3, 5] = float("nan")
    sd["text_proj.bias"][0] = float("inf")
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt")
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="corrupted weights") as info:
        load_weights(resolve(directory))
    assert "vision_proj.weight: 1 of 32768 values are NaN or Inf" in str(info.value)
    assert "text_proj.bias" in str(info.value)


def test_integer_weights_are_corrupted(tiny_ckpt: Path) -> None:
    sd = _weights(tiny_ckpt)
    sd["itm_head.bias"] = torch.tensor([1, 2])
    with pytest.raises(CheckpointError, match=r"itm_head.bias: dtype torch.int64 is not floating"):
        check_state_dict(sd, BlipConfig.preset("tiny"))


# -- load_into --------------------------------------------------------------------------------


def _reference_model(config: BlipConfig) -> torch.nn.Module:
    hf_config = transformers.BlipConfig.from_dict(config.to_hf_dict())
    return transformers.BlipForImageTextRetrieval(hf_config).eval()


def test_load_into_module_with_hf_names(tiny_ckpt: Path) -> None:
    sd = load_weights(resolve(tiny_ckpt))
    model = _reference_model(BlipConfig.preset("tiny"))
    load_into(model, sd)
    _assert_same(model.state_dict(), sd)


def test_load_into_casts_in_place_and_assigns_as_is_on_meta() -> None:
    sd = {"weight": torch.randn(4, 3, dtype=torch.float64), "bias": torch.randn(4)}
    module = torch.nn.Linear(3, 4).to(torch.bfloat16)
    load_into(module, sd)
    assert module.weight.dtype == torch.bfloat16
    assert torch.equal(module.weight, sd["weight"].to(torch.bfloat16))
    with torch.device("meta"):
        lazy = torch.nn.Linear(3, 4)
    load_into(lazy, sd)  # assigned, not copied: the caller chose the dtype when reading
    assert not lazy.weight.is_meta and lazy.weight.dtype == torch.float64
    assert lazy.weight.data_ptr() == sd["weight"].data_ptr()
    assert torch.equal(lazy.bias, sd["bias"])


def test_load_into_reports_against_the_module() -> None:
    module = torch.nn.Linear(3, 4)
    with pytest.raises(
        CheckpointError, match=r"Linear module(.|\n)*weight: expected \(4, 3\), got \(4, 2\)"
    ):
        load_into(module, {"weight": torch.randn(4, 2), "bias": torch.randn(4)})
    before = module.weight.detach().clone()
    with pytest.raises(CheckpointError, match="NaN"):
        load_into(module, {"weight": torch.full((4, 3), float("nan")), "bias": torch.randn(4)})
    assert torch.equal(module.weight, before)  # nothing half-loaded


# -- resolving local checkpoints --------------------------------------------------------------


def test_resolve_hub_layout_dir(tiny_ckpt: Path) -> None:
    r = resolve(tiny_ckpt)
    assert r.kind == "hf" and r.source == str(tiny_ckpt)
    assert r.weights_path == tiny_ckpt / "model.safetensors"
    assert r.config == BlipConfig.preset("tiny")
    assert r.config_dict == json.loads((tiny_ckpt / "config.json").read_text())
    assert r.tokenizer_dir == tiny_ckpt
    assert r.image_settings_dict["size"] == {"height": 48, "width": 48}
    assert r.revision is None and r.commit is None


def test_resolve_saved_layout_dir(tiny_ckpt: Path, tiny_ckpt_saved_layout: Path) -> None:
    r = resolve(tiny_ckpt_saved_layout)
    assert r.kind == "hf" and r.config == BlipConfig.preset("tiny")
    assert r.image_settings_dict["image_processor_type"] == "BlipImageProcessor"
    assert r.image_settings_dict["size"] == {"height": 48, "width": 48}
    _assert_same(load_weights(r), load_weights(resolve(tiny_ckpt)))


def test_resolve_prefers_safetensors_and_reads_bin(tiny_ckpt: Path, tmp_path: Path) -> None:
    sd = _weights(tiny_ckpt)
    both = _copy_dir(tiny_ckpt, tmp_path / "both")
    # What the hub repos actually hold: a .bin from older transformers, with position_ids.
    legacy = sd | {"text_encoder.embeddings.position_ids": torch.arange(512)[None]}
    torch.save(legacy, both / "pytorch_model.bin")
    assert resolve(both).weights_path.name == "model.safetensors"
    only_bin = _copy_dir(both, tmp_path / "bin", skip=("model.safetensors",))
    r = resolve(only_bin)
    assert r.kind == "hf" and r.weights_path.name == "pytorch_model.bin"
    _assert_same(load_weights(r), sd)
    # A weights file inside an HF directory resolves to that directory with that file.
    r = resolve(both / "pytorch_model.bin")
    assert r.kind == "hf" and r.weights_path == both / "pytorch_model.bin"


def test_resolve_pth(tiny_ckpt: Path, tiny_pth: Path) -> None:
    r = resolve(tiny_pth)
    assert r.kind == "pth" and r.weights_path == tiny_pth
    assert r.config == _blip_config(BlipConfig.preset("tiny"))
    assert r.config.text.num_attention_heads == 3  # 192 // 64, not the hub-style 4
    assert r.tokenizer_dir == tiny_pth.parent  # the tokenizer beside the file
    assert r.image_settings_dict["size"] == {"height": 48, "width": 48}
    assert r.config_dict == r.config.to_hf_dict()


def test_hf_and_pth_of_one_seed_load_identically(tiny_ckpt: Path, tiny_pth: Path) -> None:
    _assert_same(load_weights(resolve(tiny_ckpt)), load_weights(resolve(tiny_pth)))


def test_pth_with_explicit_tokenizer(tiny_ckpt: Path, tiny_pth: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.pth"
    shutil.copy(tiny_pth, lone)
    assert resolve(lone, tokenizer=tiny_ckpt).tokenizer_dir == tiny_ckpt
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer directory"):
        resolve(lone, tokenizer=empty)


def test_pth_default_tokenizer_comes_from_the_hub(
    tiny_pth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lone = tmp_path / "lone.pth"
    shutil.copy(tiny_pth, lone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnavailableError, match="bert-base-uncased"):
        resolve(lone)


@pytest.mark.parametrize(
    ("missing", "listed"),
    [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors or model.safetensors.index.json"),
        (("tokenizer.json", "vocab.txt"), "tokenizer.json or vocab.txt"),
        ("preprocessor_config.json", "preprocessor_config.json or processor_config.json"),
    ],
)
def test_incomplete_dir_lists_what_is_missing(
    tiny_ckpt: Path, tmp_path: Path, missing: str | tuple[str, ...], listed: str
) -> None:
    skip = (missing,) if isinstance(missing, str) else missing
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt", skip=skip)
    with pytest.raises(CheckpointError, match="missing") as info:
        resolve(directory)
    assert listed in str(info.value)
    assert "A Hugging Face BLIP directory holds" in str(info.value)


def test_tokenizer_json_alone_or_vocab_alone_is_enough(tiny_ckpt: Path, tmp_path: Path) -> None:
    assert resolve(_copy_dir(tiny_ckpt, tmp_path / "a", skip=("vocab.txt",))).kind == "hf"
    assert resolve(_copy_dir(tiny_ckpt, tmp_path / "b", skip=("tokenizer.json",))).kind == "hf"


def test_bad_config_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    directory = _copy_dir(tiny_ckpt, tmp_path / "ckpt")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        resolve(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match="model_type"):
        resolve(directory)


@pytest.mark.parametrize(
    "source",
    ["./no/such/dir", "/no/such/model.pth", "not-a-hub-id", "a/b/c", "missing.safetensors"],
)
def test_neither_path_nor_hub_id(source: str) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory, and not a hub id"):
        resolve(source)


def test_existing_non_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve(path)


# -- conversion -------------------------------------------------------------------------------


def test_convert_round_trip(tiny_pth: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = convert_to_hf(tiny_pth, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    }
    r = resolve(out)
    assert r.kind == "hf"
    assert r.config == _blip_config(BlipConfig.preset("tiny"))
    assert r.config_dict["text_config"]["num_attention_heads"] == 3  # width // 64
    _assert_same(load_weights(r), load_weights(resolve(tiny_pth)))
    _assert_same(load_weights(r), _weights(tiny_ckpt))

    model, info = transformers.BlipForImageTextRetrieval.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same({k: v for k, v in model.state_dict().items()}, _weights(tiny_ckpt))
    assert model.config.vision_config.layer_norm_eps == BLIP_VISION_LN_EPS
    tok = transformers.BertTokenizerFast.from_pretrained(out)
    assert len(tok) >= 30522
    processor = transformers.BlipProcessor.from_pretrained(out)
    assert processor.image_processor.size == {"height": 48, "width": 48}


def test_convert_refuses_non_empty_dir(tiny_pth: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_to_hf(tiny_pth, out)
    convert_to_hf(tiny_pth, out, overwrite=True)
    assert not (out / "pytorch_model.bin").exists()  # no stale weights beside the new ones
    assert resolve(out).weights_path.name == "model.safetensors"


def test_convert_with_vocab_only_tokenizer(tiny_pth: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(tiny_ckpt / "vocab.txt", tok_dir / "vocab.txt")
    lone = tmp_path / "lone.pth"
    shutil.copy(tiny_pth, lone)
    out = convert_to_hf(lone, tmp_path / "hf", tokenizer=tok_dir)
    assert not (out / "tokenizer.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True
    assert len(transformers.BertTokenizerFast.from_pretrained(out)) >= 30522


def test_convert_checks_before_writing(tiny_pth: Path, tmp_path: Path) -> None:
    sd = torch.load(tiny_pth, weights_only=True)["model"]
    sd["itm_head.weight"] = torch.randn(3, 192)
    bad = tmp_path / "bad.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match=r"itm_head\.weight"):
        convert_to_hf(bad, tmp_path / "out", tokenizer=tiny_pth.parent)
    assert not (tmp_path / "out").exists()


# -- the hub ----------------------------------------------------------------------------------


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE, set after huggingface_hub was imported."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_offline_with_empty_cache(offline_cache: Path) -> None:
    with pytest.raises(HubUnavailableError) as info:
        resolve(REPO)
    message = str(info.value)
    assert "could not be reached" in message and "HF_HUB_OFFLINE" in message
    assert str(offline_cache) in message
    assert 'blipitm.load("/path/to/blip-itm-base-flickr")' in message
    assert f"download {REPO} --local-dir" in message
    assert isinstance(info.value, CheckpointError)


def _populate_cache(
    cache: Path, repo: str, snapshots: dict[str, int], refs: dict[str, str]
) -> Path:
    """The huggingface_hub cache layout: models--owner--name/{snapshots/<commit>/, refs/<name>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for commit, seed in snapshots.items():
        make_checkpoint(root / "snapshots" / commit, preset="tiny", seed=seed)
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
    return root


def test_offline_cache_with_revision_pinning(offline_cache: Path) -> None:
    root = _populate_cache(offline_cache, REPO, {COMMIT_A: 0, COMMIT_B: 1}, {"main": COMMIT_B})
    latest = resolve(REPO)
    assert latest.kind == "hf" and latest.source == REPO
    assert latest.commit == COMMIT_B and latest.revision is None
    assert latest.weights_path.parent == root / "snapshots" / COMMIT_B
    pinned = resolve(REPO, revision=COMMIT_A)
    assert pinned.commit == COMMIT_A and pinned.revision == COMMIT_A
    _assert_same(load_weights(pinned), _weights(root / "snapshots" / COMMIT_A))
    assert not torch.equal(
        load_weights(latest)["itm_head.weight"], load_weights(pinned)["itm_head.weight"]
    )
    with pytest.raises(HubUnavailableError, match=r"revision 'v2\.0'"):
        resolve(REPO, revision="v2.0")


def test_hf_home_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _populate_cache(tmp_path / "hf-home" / "hub", REPO, {COMMIT_A: 2}, {"main": COMMIT_A})
    assert resolve(REPO).commit == COMMIT_A


def test_tokenizer_hub_id_from_cache(offline_cache: Path, tiny_pth: Path, tmp_path: Path) -> None:
    root = offline_cache / "models--bert-base-uncased"
    snapshot = root / "snapshots" / COMMIT_A
    snapshot.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_pth.parent / name, snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT_A)
    lone = tmp_path / "lone.pth"
    shutil.copy(tiny_pth, lone)
    assert resolve(lone).tokenizer_dir == snapshot  # default: bert-base-uncased
    assert resolve(lone, tokenizer="bert-base-uncased").tokenizer_dir == snapshot


def _raise(exc: BaseException) -> Callable[..., str]:
    def fake(*args: object, **kwargs: object) -> str:
        raise exc

    return fake


def _online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))


def _http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls("hub says no", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error",
    [
        LocalEntryNotFoundError("connection error, and no cached snapshot"),
        ConnectionError("network is unreachable"),
        TimeoutError("timed out"),
    ],
)
def test_unreachable_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException
) -> None:
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(resolve_module, "snapshot_download", _raise(error))
    with pytest.raises(HubUnavailableError) as info:
        resolve(REPO)
    message = str(info.value)
    assert "could not be reached" in message and "set HF_HUB_OFFLINE=1" in message
    assert "HF_HUB_OFFLINE is set" not in message


def test_unreachable_hub_transport_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(resolve_module, "snapshot_download", _raise(httpx2.ConnectError("dns")))
    with pytest.raises(HubUnavailableError, match="could not be reached"):
        resolve(REPO)


def test_hub_server_error_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(
        resolve_module, "snapshot_download", _raise(_http_error(HfHubHTTPError, 503))
    )
    with pytest.raises(HubUnavailableError):
        resolve(REPO)


def test_repo_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _online(monkeypatch, tmp_path)
    error = _http_error(RepositoryNotFoundError, 404)
    monkeypatch.setattr(resolve_module, "snapshot_download", _raise(error))
    with pytest.raises(CheckpointError, match="not found on the Hugging Face hub") as info:
        resolve("Salesforce/blip-itm-nope")
    assert not isinstance(info.value, HubUnavailableError)


def test_revision_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _online(monkeypatch, tmp_path)
    error = _http_error(RevisionNotFoundError, 404)
    monkeypatch.setattr(resolve_module, "snapshot_download", _raise(error))
    with pytest.raises(CheckpointError, match="revision 'nope' not found") as info:
        resolve(REPO, revision="nope")
    assert not isinstance(info.value, HubUnavailableError)


def test_download_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_ckpt: Path
) -> None:
    """Online: only the needed files, the pinned revision, the cache the environment names."""
    _online(monkeypatch, tmp_path)
    snapshot = _copy_dir(tiny_ckpt, tmp_path / "snapshots" / COMMIT_B)
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake(*args: object, **kwargs: object) -> str:
        calls.append((args, kwargs))
        return str(snapshot)

    monkeypatch.setattr(resolve_module, "snapshot_download", fake)
    r = resolve(REPO, revision="main")
    assert r.commit == COMMIT_B and r.revision == "main"
    (args, kwargs) = calls[0]
    assert args == (REPO,) and kwargs["revision"] == "main"
    assert kwargs["local_files_only"] is False
    assert kwargs["cache_dir"] == str(tmp_path / "cache")
    patterns = kwargs["allow_patterns"]
    assert isinstance(patterns, list)
    assert {"config.json", "*.safetensors", "pytorch_model.bin", "vocab.txt"} <= set(patterns)
    assert "*.msgpack" not in patterns and "*.h5" not in patterns
