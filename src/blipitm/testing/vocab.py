"""A generated stand-in for the bert-base-uncased WordPiece vocabulary, and its tokenizer files.

Same size (30522) and the same special-token ids as the real vocabulary, so every fixed id in
BLIP ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then [DEC]/[ENC] at 30522/30523 beyond
it) holds; enough characters and common words that ordinary captions tokenize without [UNK].
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from blipitm.checkpoint import layout
from blipitm.config import CLS_TOKEN_ID, SEP_TOKEN_ID

BERT_VOCAB_SIZE = 30522
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # order BertTokenizerFast adds them

_ACCENTED = "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿœß"
_CJK = "的一是不了人我在有他这中文大来上国个到说们为子和你地出道也时年日本猫狗山水"
_KANA = "あいうえおかきくけこアイウエオ"
_EMOJI = "🙂🐶"

_WORD_TEXT = """
the a an and or but of in on at to from by with without for about over under near behind between
into onto through across along around against down up out off inside outside above below beside
next front back top bottom left right middle side is are was were be been being am has have had
do does did will would can could should may might must not no yes this that these those there here
it its he she they we you i me him her them us his their our your my who what which where when
why how all some many much more most few several each every other another one two three four five
six seven eight nine ten first second last big small large little tall short long old young new
red blue green yellow black white brown gray grey orange pink purple dark light bright colorful
man men woman women boy boys girl girls child children kid kids baby person people player players
group crowd family friends couple dog dogs cat cats horse horses bird birds cow cows sheep bear
elephant giraffe zebra animal animals fish duck car cars truck bus train bike bicycle motorcycle
boat plane airplane street road sidewalk city building buildings house home room kitchen table
chair bench couch bed window door wall floor grass field park beach water ocean sea lake river
snow sand tree trees flower flowers sky sun mountain hill rock forest garden yard ball frisbee
kite umbrella hat shirt dress jacket coat shoes glasses bag food pizza cake sandwich plate cup
bowl bottle phone computer laptop book sign picture camera guitar toy stage game team sport
soccer football baseball basketball tennis race runs run running walks walk walking sits sit
sitting stands stand standing plays play playing rides ride riding jumps jump jumping looks look
looking holds hold holding eats eat eating wears wear wearing smiles smile smiling climbs climbing
swims swimming throws throwing catches catching waits waiting talks talking watches watching
carries carrying poses posing lying laying sleeping sleeps flying flies reading cooking dancing
singing working together while during very just only also other same different close open empty
full busy quiet wet dry hot cold sunny cloudy rainy day night morning evening time photo image
view scene area line lot way part pair piece set few near far some any as like than then so if
"""
_SUFFIX_TEXT = (
    "s es ed ing ly er ers est ion ions ness ment y ful able al ic ive ous ity ize ist ism"
)


def make_vocab() -> list[str]:
    """The 30522 tokens, id order. Words are spread over the whole id range (filler between them),
    so that tests exercise high embedding rows too, up to the last one."""
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation + _ACCENTED + _CJK
    chars += _KANA + _EMOJI
    head += [*chars, *(f"##{c}" for c in chars)]
    taken = set(head)
    spread = [
        t
        for t in dict.fromkeys([*_WORD_TEXT.split(), *(f"##{s}" for s in _SUFFIX_TEXT.split())])
        if t not in taken
    ]
    slots = BERT_VOCAB_SIZE - len(head)
    # Evenly spaced positions in [0, slots - 1]: the first word right after the characters, the
    # last one on the last line.
    positions = {round(i * (slots - 1) / (len(spread) - 1)): t for i, t in enumerate(spread)}
    filler = (f"[unused{i}]" for i in range(99, 99 + slots))  # "[" splits: never matches text
    tail = [positions[i] if i in positions else next(filler) for i in range(slots)]
    vocab = head + tail
    assert len(vocab) == BERT_VOCAB_SIZE and len(set(vocab)) == BERT_VOCAB_SIZE
    return vocab


def build_tokenizer(vocab: list[str]) -> Tokenizer:
    """The pipeline transformers' ``BertTokenizerFast`` builds for an uncased vocabulary."""
    tok = Tokenizer(
        WordPiece(
            {t: i for i, t in enumerate(vocab)},
            unk_token="[UNK]",
            continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_TOKEN_ID), ("[SEP]", SEP_TOKEN_ID)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer_files(out_dir: Path, *, layout_name: str = "hub") -> None:
    """``hub``: vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    ``saved`` (transformers ``save_pretrained`` today): tokenizer.json, tokenizer_config.json."""
    vocab = make_vocab()
    build_tokenizer(vocab).save(str(out_dir / layout.TOKENIZER_JSON_NAME))
    config = layout.tokenizer_config_dict()
    if layout_name == "hub":
        (out_dir / layout.VOCAB_NAME).write_text("\n".join(vocab) + "\n", encoding="utf-8")
        layout.write_json(out_dir / layout.SPECIAL_TOKENS_MAP_NAME, dict(layout.SPECIAL_TOKENS))
    else:
        config = {**config, "backend": "tokenizers"}
    layout.write_json(out_dir / layout.TOKENIZER_CONFIG_NAME, config)
