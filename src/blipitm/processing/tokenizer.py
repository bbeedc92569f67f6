"""BERT WordPiece tokenization with the ``tokenizers`` library, id-for-id equal to transformers.

A checkpoint directory carries either ``tokenizer.json`` (used as is) or only ``vocab.txt`` (plus
``tokenizer_config.json``), from which we build the pipeline transformers' ``BertTokenizerFast``
builds. Padding is not the tokenizer's job here: the engine pads each batch to its own longest text
(:func:`pad`), which is what makes short texts cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from blipitm.config import CLS_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID
from blipitm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Special tokens BertTokenizerFast registers by default (tokenizer_config.json may rename them).
_SPECIAL_TOKEN_DEFAULTS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


class Tokenizer:
    """Text → token ids, ``[CLS] … [SEP]``, unpadded; safe to share between threads.

    The wrapped ``tokenizers.Tokenizer`` is never reconfigured after construction (truncation is
    applied per encoding, not by toggling tokenizer state), which is what makes sharing safe.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "tokenizer") -> None:
        """Take ownership of ``backend``: its padding and truncation are switched off.

        ``source`` names where it came from, for error messages.
        """
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        expected = {"[PAD]": PAD_TOKEN_ID, "[CLS]": CLS_TOKEN_ID, "[SEP]": SEP_TOKEN_ID}
        for token, want in expected.items():
            got = backend.token_to_id(token)
            if got != want:
                raise CheckpointError(
                    f"{source}: {token} has id {got}, but BLIP checkpoints need {want} "
                    "(bert-base-uncased vocabulary); is this the right tokenizer?"
                )
        empty = backend.encode("").ids
        if empty != [CLS_TOKEN_ID, SEP_TOKEN_ID]:
            raise CheckpointError(
                f"{source}: the empty text encodes to {empty}, expected "
                f"[{CLS_TOKEN_ID}, {SEP_TOKEN_ID}] ([CLS] [SEP]); its post-processor must add them"
            )
        self._num_special = backend.num_special_tokens_to_add(False)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a checkpoint directory: ``tokenizer.json`` if present, else ``vocab.txt``."""
        directory = Path(path)
        tokenizer_json = directory / TOKENIZER_FILE
        vocab_txt = directory / VOCAB_FILE
        if tokenizer_json.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
            except Exception as e:  # tokenizers raises plain Exception on bad JSON
                raise CheckpointError(f"cannot read {tokenizer_json}: {e}") from e
            return cls(backend, source=str(tokenizer_json))
        if vocab_txt.is_file():
            config = _read_config(directory / TOKENIZER_CONFIG_FILE)
            return cls(_bert_wordpiece(vocab_txt, config), source=str(vocab_txt))
        raise CheckpointError(
            f"no tokenizer in {directory}: looked for {TOKENIZER_FILE} and {VOCAB_FILE}; "
            "copy the tokenizer files of the checkpoint (e.g. from the hub repo) next to it"
        )

    @property
    def vocab_size(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def cls_token_id(self) -> int:
        return CLS_TOKEN_ID

    @property
    def sep_token_id(self) -> int:
        return SEP_TOKEN_ID

    @property
    def pad_token_id(self) -> int:
        return PAD_TOKEN_ID

    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry of each id (word pieces keep their ``##``)."""
        return [self._backend.id_to_token(int(i)) or "[UNK]" for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as BERT decodes it: special tokens and ids outside the vocabulary
        (``[DEC]``, ``[ENC]``) skipped, word pieces joined, the tokenizer's own cleanup."""
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=True))

    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, ``[CLS] … [SEP]``, without padding.

        With ``max_length`` the word pieces are cut so that the result has at most ``max_length``
        ids and still ends with ``[SEP]`` — the same steps ``tokenizers`` takes for
        ``BertTokenizerFast(truncation=True, max_length=...)``: truncate the bare encoding to
        ``max_length`` minus the special tokens, then post-process.
        """
        if max_length is None:
            return [e.ids for e in self._backend.encode_batch(list(texts))]
        if max_length < self._num_special:
            raise ValueError(
                f"max_length must be at least {self._num_special} ([CLS] and [SEP]), "
                f"got {max_length}"
            )
        out: list[list[int]] = []
        for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False):
            encoding.truncate(max_length - self._num_special)
            out.append(self._backend.post_process(encoding).ids)
        return out


def pad(
    ids: Sequence[Sequence[int]], pad_id: int = PAD_TOKEN_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the batch's longest: ``input_ids`` and ``attention_mask``, int64 ``[B, T]``.

    Padding to the batch (not to a fixed 35 or 512) is the point: attention cost grows with T.
    """
    import torch  # here, not at import: the tokenizer and this package stay torch-free

    length = max((len(seq) for seq in ids), default=0)
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(ids), length), dtype=np.int64)  # [B, T]
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def _bert_wordpiece(vocab_txt: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    """The pipeline transformers 5.x ``BertTokenizer`` builds from ``vocab.txt``.

    Normaliser, pre-tokenizer, model and template are those of ``tokenization_bert.py``; the
    special tokens are registered the way its base class does (special, not normalised), so that
    a literal "[CLS]" in a text is the special token, as in transformers.
    """
    try:
        vocab = WordPiece.read_file(str(vocab_txt))  # the reader transformers uses, too
    except Exception as e:
        raise CheckpointError(f"cannot read {vocab_txt}: {e}") from e
    names = {
        key: _token_content(config.get(key, default))
        for key, default in _SPECIAL_TOKEN_DEFAULTS.items()
    }
    backend = tokenizers.Tokenizer(
        WordPiece(vocab, unk_token=names["unk_token"], max_input_chars_per_word=100)
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=bool(config.get("do_lower_case", True)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_token, sep_token = names["cls_token"], names["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[
            (cls_token, vocab.get(cls_token, -1)),
            (sep_token, vocab.get(sep_token, -1)),
        ],
    )
    added = _added_tokens(config, names)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend


def _added_tokens(config: dict[str, Any], names: dict[str, str]) -> list[AddedToken]:
    """Tokens from ``added_tokens_decoder`` (with their flags), then the named special tokens."""
    tokens: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        tokens.append(
            AddedToken(
                entry["content"],
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not entry.get("special", True))),
                special=bool(entry.get("special", True)),
            )
        )
    present = {t.content for t in tokens}
    tokens += [AddedToken(n, special=True) for n in names.values() if n not in present]
    return tokens


def _token_content(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value["content"])
    return str(value)
