"""BLIP caption cleanup, and the text checks shared by every entry point."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blipitm.errors import InvalidInputError
from blipitm.processing.text import pre_caption, validate_text


def blip_pre_caption(caption: str, max_words: int = 50) -> str:
    """Salesforce BLIP data/utils.py ``pre_caption``, transcribed literally as the reference."""
    caption = re.sub(
        r"([.!\"()*#:;~])",
        " ",
        caption.lower(),
    )
    caption = re.sub(
        r"\s{2,}",
        " ",
        caption,
    )
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")

    # truncate caption
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])

    return caption


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A dog runs on the grass.", "a dog runs on the grass"),
        ("Two men (one in red) play: chess!", "two men one in red play chess"),
        ('He said "hi" #tag *star* ~tilde; end', "he said hi tag star tilde end"),
        (
            "keeps, commas? and-dashes/slashes 'quotes'",
            "keeps, commas? and-dashes/slashes 'quotes'",
        ),
        ("many     spaces   here", "many spaces here"),
        ("tab\tsingle stays", "tab\tsingle stays"),
        ("tabs\t\tcollapse", "tabs collapse"),
        ("line\nbreak", "line\nbreak"),
        ("trailing newline\n", "trailing newline"),
        ("  padded  ", "padded"),
        ("...leading dots", "leading dots"),
        ("UPPER Case ÉCOLE", "upper case école"),
        ("", ""),
        ("   ", ""),
        ('.!"()*#:;~', ""),
        ("a.b.c", "a b c"),
    ],
)
def test_pre_caption_examples(caption: str, expected: str) -> None:
    assert pre_caption(caption) == expected
    assert blip_pre_caption(caption, 30) == expected  # the expectations are BLIP's own


def test_pre_caption_keeps_first_30_words() -> None:
    caption = " ".join(f"w{i}" for i in range(45))
    assert pre_caption(caption) == " ".join(f"w{i}" for i in range(30))
    assert pre_caption(caption, max_words=3) == "w0 w1 w2"
    assert pre_caption("a b", max_words=0) == ""
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a", max_words=-1)


def test_pre_caption_counts_words_as_blip_does() -> None:
    # A single tab is not a separator for BLIP's split(' '): "a\tb" is one word.
    assert pre_caption("a\tb c", max_words=1) == "a\tb"
    assert pre_caption("a\tb c", max_words=1) == blip_pre_caption("a\tb c", 1)


_TRICKY = list(".!\"()*#:;~,?-'/ \t\n\r\x0b\x0c\x1c\x85\u00a0\u2003\u2028\u3000") + list(
    "aAzZéÉİßΣς0 9你好😀\u200b\u0301"
)


def _random_caption(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 60)):
        kind = rng.random()
        if kind < 0.5:
            pieces.append(rng.choice(_TRICKY))
        elif kind < 0.8:
            pieces.append(rng.choice(["dog", "A", "Man", "ÉCOLE", "ok", "x"]))
        else:
            pieces.append(chr(rng.randint(0x20, 0x2FFF)))
    return "".join(pieces)


def test_pre_caption_equals_blip_on_random_corpus() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        caption = _random_caption(rng)
        max_words = rng.choice([0, 1, 2, 5, 30, 50])
        assert pre_caption(caption, max_words) == blip_pre_caption(caption, max_words), caption


@settings(max_examples=300, deadline=None, database=None)
@given(
    caption=st.text(alphabet=st.sampled_from(_TRICKY) | st.characters(), max_size=200),
    max_words=st.integers(min_value=0, max_value=40),
)
def test_pre_caption_equals_blip_hypothesis(caption: str, max_words: int) -> None:
    assert pre_caption(caption, max_words) == blip_pre_caption(caption, max_words)


def test_validate_text_accepts_strings() -> None:
    assert validate_text("a dog", loc=("texts", 0)) == "a dog"
    assert validate_text(" ", loc=("texts", 0)) == " "
    assert validate_text("café 😀", loc=("texts", 0), max_chars=6) == "café 😀"


@pytest.mark.parametrize("value", [None, 3, b"bytes", ["a"], 1.5])
def test_validate_text_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_text(value, loc=("texts", 2))
    assert info.value.field == "texts[2]"
    assert str(info.value).startswith("texts[2]: ")
    assert type(value).__name__ in str(info.value)


def test_validate_text_rejects_the_empty_string() -> None:
    with pytest.raises(InvalidInputError, match="text is empty") as info:
        validate_text("", loc=("texts", 3))
    assert info.value.field == "texts[3]"


def test_validate_text_length_limit() -> None:
    assert validate_text("x" * 10, loc=("q",), max_chars=10)
    with pytest.raises(InvalidInputError, match="11 characters, over the limit of 10") as info:
        validate_text("x" * 11, loc=("q",), max_chars=10)
    assert info.value.field == "q"


def test_validate_text_rejects_lone_surrogates() -> None:
    with pytest.raises(InvalidInputError, match="surrogate") as info:
        validate_text("ab\ud800", loc=("texts", 1))
    assert info.value.field == "texts[1]"
