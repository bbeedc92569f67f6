"""Text inputs: BLIP's caption cleanup and the checks every text goes through before tokenizing."""

from __future__ import annotations

import re

from blipitm.errors import InvalidInputError, Loc
from blipitm.scoring import BLIP_MAX_CAPTION_WORDS, ScoringProtocol

# The characters BLIP replaces by a space (data/utils.py). Others, commas and '?' included, stay.
_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
# Only runs of two or more whitespace characters collapse: a single tab or newline survives, as in
# BLIP.
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = BLIP_MAX_CAPTION_WORDS) -> str:
    """Clean a caption exactly as Salesforce BLIP's ``data/utils.py`` ``pre_caption`` does.

    The ``blip`` protocol applies this because the model was trained and evaluated on captions
    cleaned this way; any deviation (even keeping a trailing period) changes the scores. The steps
    and their order are BLIP's: lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space; runs
    of whitespace become one space; one trailing newline and surrounding spaces are stripped; only
    the first ``max_words`` space-separated words are kept.
    """
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    text = _CAPTION_PUNCTUATION.sub(" ", caption.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def clean_caption(text: str, protocol: ScoringProtocol) -> str:
    """``text`` as ``protocol`` feeds it to the tokenizer: BLIP's :func:`pre_caption` or as is."""
    if protocol.caption_max_words is None:
        return text
    return pre_caption(text, protocol.caption_max_words)


def validate_text(text: object, *, loc: Loc = ("text",), max_chars: int | None = None) -> str:
    """Return ``text`` if it can be tokenized, else raise :class:`InvalidInputError`.

    The empty string is refused, as OpenAI's embeddings API does: it would tokenize to
    ``[CLS] [SEP]`` and score as if it were a caption, which is never what the caller meant.
    ``max_chars`` bounds the work a single request can cause before truncation happens. Lone
    surrogates are rejected here because the tokenizer would otherwise fail with an opaque encoding
    error.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"expected a string, got {type(text).__name__}", loc=loc)
    if not text:
        raise InvalidInputError("text is empty; send at least one character", loc=loc)
    if max_chars is not None and len(text) > max_chars:
        raise InvalidInputError(
            f"text is {len(text)} characters, over the limit of {max_chars}", loc=loc
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(
                f"text is not valid Unicode (character {e.start} is a lone surrogate)",
                loc=loc,
            ) from None
    return text
