"""Tokenizer: ids equal to transformers' BertTokenizerFast on the same files, for any string."""

from __future__ import annotations

import json
import random
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from blipitm.config import CLS_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID
from blipitm.errors import CheckpointError
from blipitm.processing.tokenizer import Tokenizer, pad

BERT_VOCAB_SIZE = 30522

_WORD_LINES = """
a an the and or but of in on at to from with by for over under above below near into onto
is are was were be been being has have had do does did will would can could should may might
dog dogs cat cats man men woman women child children boy girl people person baby player team
car bus bike train plane boat truck street road city building house room kitchen table chair
bed window door wall floor water river lake sea beach sand snow grass tree trees field park
sky sun cloud rain mountain hill rock stone flower garden food pizza cake plate cup glass bowl
ball frisbee kite skateboard surfboard umbrella bag hat shirt jacket dress shoes helmet glasses
red blue green yellow black white brown orange pink purple gray grey small large big little
young old tall short long two three four five several many some one other another each
sitting standing walking running playing riding holding eating drinking looking wearing
jumping throwing catching smiling talking waiting climbing swimming flying driving reading
front back top side middle next behind while during after before through around down up out
this that these those there here it its his her their my your our who what where when how
very just only also still even then than so not no yes all both most more less
photo picture image view scene group crowd couple pair line row lot kind type
cafe naive ecole hello world test text
"""
_WORDS = _WORD_LINES.split()

_SUFFIXES = ["s", "es", "ing", "ed", "er", "ers", "est", "ly", "ness", "tion", "ment", "able", "y"]

_CHARS = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + "éèêëàâäïîôöùûüçñÉÈÀÇÑ"
    + "你好世界中国人日本語한국"
    + "😀🐶"
)


def write_bert_vocab(directory: Path, config: dict[str, Any] | None = None) -> Path:
    """A bert-base-uncased-shaped vocabulary: 30522 lines, special tokens at their real ids."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(_CHARS) + [f"##{c}" for c in _CHARS]
    tokens += _WORDS + [f"##{s}" for s in _SUFFIXES]
    unique = list(dict.fromkeys(tokens))
    unique += [f"filler{i}" for i in range(BERT_VOCAB_SIZE - len(unique))]
    assert len(unique) == BERT_VOCAB_SIZE
    assert unique.index("[CLS]") == CLS_TOKEN_ID and unique.index("[SEP]") == SEP_TOKEN_ID
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(unique) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config if config is not None else {"do_lower_case": True})
    )
    return directory


def reference(directory: Path) -> Any:
    """transformers' tokenizer, built the only safe way in 5.x: ``from_pretrained`` on the folder.

    Its ids are what ours must equal (docs/architecture.md, "Preprocessing").
    """
    ref = transformers.BertTokenizerFast.from_pretrained(str(directory))
    assert len(ref) >= BERT_VOCAB_SIZE
    return ref


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_vocab(tmp_path_factory.mktemp("vocab_only"))


@pytest.fixture(scope="module")
def json_dir(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tokenizer.json`` and config as transformers' save_pretrained writes them; no vocab.txt."""
    directory = tmp_path_factory.mktemp("tokenizer_json")
    reference(vocab_dir).save_pretrained(str(directory))
    assert (directory / "tokenizer.json").is_file()
    assert not (directory / "vocab.txt").exists()
    return directory


@pytest.fixture(scope="module")
def ref(vocab_dir: Path) -> Any:
    return reference(vocab_dir)


def _long_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pool = [*_WORDS, "Running", "CAFÉ", "you're", "x-ray", "3.14", "naïve", "日本", "😀"]
    return " ".join(rng.choice(pool) for _ in range(n_words))


CORPUS = [
    "a dog runs on the grass",
    "A Dog RUNS on THE grass.",
    "café naïve ÉCOLE Ångström façade",
    "你好世界 中国人 日本語のテキスト 한국어",
    "emoji 😀🐶 and 👍🏽 and 🇫🇷 flags",
    "mixed Русский текст and English and العربية and עברית",
    "!!!???... a---b ((x)) [y] {z} <w> @#$%^&*",
    "control\x00chars\x07here\x1b[0m and \x7f del",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeed",
    "zero\u200bwidth\u200cjoin\u200dchars\ufeffbom",
    "combining e\u0301 and a\u0308 accents",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "",
    "   ",
    "\t\n ",
    "[CLS]",
    "a [CLS] in the middle [SEP] and [PAD] [MASK] [UNK]",
    "literal [ENC] and [DEC] tokens",
    "lowercase [cls] is not special",
    "supercalifragilisticexpialidocious" * 4,  # over WordPiece's 100 chars per word
    "runnings jumpinged treeness",
    "123 4567 89.0 1,000,000",
    _long_text(300),
    _long_text(5000, seed=1),
]


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["vocab_txt", "tokenizer_json"])
def test_ids_equal_transformers(layout: str, vocab_dir: Path, json_dir: Path, ref: Any) -> None:
    tok = Tokenizer.from_dir(vocab_dir if layout == "vocab_txt" else json_dir)
    assert tok.encode(CORPUS) == ref(CORPUS)["input_ids"]


@pytest.mark.parametrize("layout", ["vocab_txt", "tokenizer_json"])
def test_truncated_ids_equal_transformers(
    layout: str, vocab_dir: Path, json_dir: Path, ref: Any
) -> None:
    tok = Tokenizer.from_dir(vocab_dir if layout == "vocab_txt" else json_dir)
    ours = tok.encode(CORPUS, max_length=35)
    assert ours == ref(CORPUS, truncation=True, max_length=35)["input_ids"]
    assert all(
        len(ids) <= 35 and ids[0] == CLS_TOKEN_ID and ids[-1] == SEP_TOKEN_ID for ids in ours
    )
    assert max(len(ids) for ids in ours) == 35


def test_tokenizer_json_reference_agrees(json_dir: Path, ref: Any) -> None:
    """The saved tokenizer.json is the same tokenizer to transformers, too."""
    assert reference(json_dir)(CORPUS)["input_ids"] == ref(CORPUS)["input_ids"]


def test_special_token_handling_matches(vocab_dir: Path, ref: Any) -> None:
    tok = Tokenizer.from_dir(vocab_dir)
    [ids] = tok.encode(["a [CLS] b"])
    assert ids.count(CLS_TOKEN_ID) == 2  # the literal is the special token, as in transformers
    [enc] = tok.encode(["[ENC]"])
    assert len(enc) > 3  # not in the vocabulary: split into pieces
    assert tok.encode([""]) == [[CLS_TOKEN_ID, SEP_TOKEN_ID]]
    assert tok.encode(["   "]) == ref(["   "])["input_ids"]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"do_lower_case": False},
        {"do_lower_case": True, "strip_accents": False, "tokenize_chinese_chars": False},
        {"do_lower_case": False, "strip_accents": True},
    ],
)
def test_tokenizer_config_options(config: dict[str, Any], tmp_path: Path) -> None:
    directory = write_bert_vocab(tmp_path / "v", config)
    ours = Tokenizer.from_dir(directory)
    theirs = reference(directory)
    assert ours.encode(CORPUS) == theirs(CORPUS)["input_ids"]


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=120))
def test_random_strings_equal_transformers(text: str, vocab_dir: Path, ref: Any) -> None:
    tok = _cached(vocab_dir)
    assert tok.encode([text]) == ref([text])["input_ids"]
    assert (
        tok.encode([text], max_length=8) == ref([text], truncation=True, max_length=8)["input_ids"]
    )


_CACHE: dict[Path, Tokenizer] = {}


def _cached(directory: Path) -> Tokenizer:
    if directory not in _CACHE:
        _CACHE[directory] = Tokenizer.from_dir(directory)
    return _CACHE[directory]


# -- behaviour ------------------------------------------------------------------------------------


def test_properties(vocab_dir: Path) -> None:
    tok = Tokenizer.from_dir(vocab_dir)
    assert tok.vocab_size == BERT_VOCAB_SIZE
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (101, 102, 0)


def test_max_length_edges(vocab_dir: Path) -> None:
    tok = Tokenizer.from_dir(vocab_dir)
    assert tok.encode(["a dog runs"], max_length=2) == [[CLS_TOKEN_ID, SEP_TOKEN_ID]]
    [three] = tok.encode(["a dog runs"], max_length=3)
    assert three[0] == CLS_TOKEN_ID and three[-1] == SEP_TOKEN_ID and len(three) == 3
    assert tok.encode(["a"], max_length=35) == tok.encode(["a"])
    assert tok.encode([]) == [] and tok.encode([], max_length=35) == []
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["a"], max_length=1)


def test_baked_in_padding_and_truncation_are_disabled(json_dir: Path, tmp_path: Path) -> None:
    backend = tokenizers.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    backend.enable_padding(length=64, pad_id=0, pad_token="[PAD]")
    backend.enable_truncation(max_length=10)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    [short, long] = tok.encode(["a dog", _long_text(40)])
    assert short == [CLS_TOKEN_ID, *short[1:-1], SEP_TOKEN_ID] and len(short) == 4
    assert len(long) > 40


def test_concurrent_encoding(vocab_dir: Path) -> None:
    tok = Tokenizer.from_dir(vocab_dir)
    jobs = [(CORPUS[i % len(CORPUS) :][:5], 35 if i % 2 else None) for i in range(32)]
    serial = [tok.encode(texts, max_length=m) for texts, m in jobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda job: tok.encode(job[0], max_length=job[1]), jobs))
    assert threaded == serial


# -- errors ---------------------------------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert "tokenizer.json" in message and "vocab.txt" in message and str(tmp_path) in message


def test_wrong_special_ids(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "a"]))
    with pytest.raises(CheckpointError, match=r"\[PAD\] has id 3"):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_config(vocab_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_json_without_template(json_dir: Path, tmp_path: Path) -> None:
    data = json.loads((json_dir / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"\[CLS\] \[SEP\]"):
        Tokenizer.from_dir(tmp_path)


# -- padding --------------------------------------------------------------------------------------


def test_pad_to_batch_longest() -> None:
    input_ids, mask = pad([[101, 5, 6, 102], [101, 102], [101, 7, 102]])
    assert input_ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert input_ids.tolist() == [[101, 5, 6, 102], [101, 102, 0, 0], [101, 7, 102, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]


def test_pad_edges() -> None:
    input_ids, mask = pad([])
    assert input_ids.shape == (0, 0) and mask.shape == (0, 0)
    input_ids, mask = pad([(101, 102)], pad_id=PAD_TOKEN_ID + 7)
    assert input_ids.tolist() == [[101, 102]] and mask.tolist() == [[1, 1]]
    input_ids, _ = pad([[1], [1, 2, 3]], pad_id=9)
    assert input_ids.tolist() == [[1, 9, 9], [1, 2, 3]]
