"""Request items: which are texts and which are images, and how score / rerank pair them.

Pure functions over the parsed request models, so the rules (vLLM's 1:1 / 1:N / N:N pairing, the
data-URI rule for plain strings, the one-image-one-text rule of ITM) are unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from blipitm.engine.batcher import LocMap
from blipitm.errors import Loc, format_loc
from blipitm.server.errors import APIError, ErrorCode
from blipitm.server.images import is_image_data_uri
from blipitm.server.schemas import Content, ImageDocument, ImageURLPart, TextDocument, TextPart


class _Located:
    loc: Loc  # where the item is in the request: ("input", 3)

    @property
    def param(self) -> str:
        """The ``param`` of an error about this item: ``input[3]``."""
        return format_loc(self.loc)


@dataclass(frozen=True)
class TextItem(_Located):
    text: str
    loc: Loc


@dataclass(frozen=True)
class ImageItem(_Located):
    source: str  # data URI, base64 or URL
    loc: Loc


Item = TextItem | ImageItem


def _bad(message: str, param: str | None, code: ErrorCode = ErrorCode.INVALID_INPUT) -> APIError:
    return APIError(400, message, code=code, param=param)


def classify(value: object, loc: Loc, *, strings_are_images: bool = False) -> Item:
    """One request item. A plain string is an image if it is a ``data:image/`` URI (or if the
    request says all its strings are images); content parts say what they are."""
    if isinstance(value, str):
        if strings_are_images or is_image_data_uri(value):
            return ImageItem(value, loc)
        return TextItem(value, loc)
    if isinstance(value, ImageURLPart):
        return ImageItem(value.image_url.url, loc)
    if isinstance(value, ImageDocument):
        return ImageItem(value.image, loc)
    if isinstance(value, TextPart | TextDocument):
        return TextItem(value.text, loc)
    if isinstance(value, int | list):
        raise _bad(
            "token id arrays are not supported: this model has its own tokenizer; send the text "
            "as a string",
            format_loc(loc),
            code=ErrorCode.UNSUPPORTED_INPUT,
        )
    raise _bad(f"unsupported item of type {type(value).__name__}", format_loc(loc))


def check_count(n: int, max_items: int, param: str) -> None:
    if n == 0:
        raise _bad("must contain at least one item", param)
    if n > max_items:
        raise APIError(
            413,
            f"{n} items in one request; the limit is {max_items} (split the request)",
            code=ErrorCode.TOO_MANY_ITEMS,
            param=param,
        )


def embedding_items(value: object, *, modality: str, max_items: int) -> list[Item]:
    images = modality == "image"
    if isinstance(value, str):
        return [classify(value, ("input",), strings_are_images=images)]
    assert isinstance(value, list)
    check_count(len(value), max_items, "input")
    if all(isinstance(v, int) for v in value):
        classify(value, ("input",))  # a single token array: raises the clear 400
    return [classify(v, ("input", i), strings_are_images=images) for i, v in enumerate(value)]


def side_items(value: object, name: str) -> list[Item]:
    """``text_1`` / ``text_2`` of a score request, or ``documents`` of a rerank request."""
    if isinstance(value, Content):
        return [classify(p, (name, "content", i)) for i, p in enumerate(value.content)]
    if isinstance(value, list):
        return [classify(v, (name, i)) for i, v in enumerate(value)]
    return [classify(value, (name,))]


def pair_indices(n1: int, n2: int) -> list[tuple[int, int]]:
    """vLLM's score pairing: 1:1 and N:N zip, 1:N pairs the one ``text_1`` with each ``text_2``.

    N:1 (several ``text_1``, one ``text_2``) is an error in vLLM too.
    """
    if n1 == 0:
        raise _bad("at least one text_1 item must be given", "text_1")
    if n2 == 0:
        raise _bad("at least one text_2 item must be given", "text_2")
    if n1 == 1:
        return [(0, j) for j in range(n2)]
    if n1 == n2:
        return [(i, i) for i in range(n1)]
    raise _bad(
        f"input lengths must be 1:1, 1:N or N:N; got {n1} text_1 and {n2} text_2 items",
        "text_2",
    )


@dataclass
class PairPlan:
    """Distinct images and texts, and (image index, text index) per requested pair."""

    images: list[ImageItem]
    texts: list[TextItem]
    pairs: list[tuple[int, int]]


def plan_pairs(side1: Sequence[Item], side2: Sequence[Item]) -> PairPlan:
    """Pair per vLLM's rules; each pair must be one image and one text, in either order."""
    plan = PairPlan([], [], [])
    image_index: dict[tuple[int, int], int] = {}  # (side, position) -> index in plan.images
    text_index: dict[tuple[int, int], int] = {}
    for i, j in pair_indices(len(side1), len(side2)):
        a, b = side1[i], side2[j]
        if isinstance(a, ImageItem) and isinstance(b, TextItem):
            img, img_key, txt, txt_key = a, (1, i), b, (2, j)
        elif isinstance(a, TextItem) and isinstance(b, ImageItem):
            img, img_key, txt, txt_key = b, (2, j), a, (1, i)
        else:
            kind = "text" if isinstance(a, TextItem) else "image"
            raise _bad(
                f"{a.param} and {b.param} are both {kind}s; image-text matching needs one image "
                "and one text per pair (images are data:image/... URIs or image_url parts)",
                b.param,
                code=ErrorCode.INVALID_PAIRING,
            )
        if img_key not in image_index:
            image_index[img_key] = len(plan.images)
            plan.images.append(img)
        if txt_key not in text_index:
            text_index[txt_key] = len(plan.texts)
            plan.texts.append(txt)
        plan.pairs.append((image_index[img_key], text_index[txt_key]))
    return plan


def check_rerank_modalities(query: Item, documents: Sequence[Item]) -> None:
    """A text query ranks images and an image query ranks texts."""
    want = TextItem if isinstance(query, ImageItem) else ImageItem
    for d in documents:
        if not isinstance(d, want):
            q = "an image" if isinstance(query, ImageItem) else "a text"
            w = "texts" if want is TextItem else "images (data:image/... URIs or image_url parts)"
            raise _bad(
                f"the query is {q}, so every document must be one of the {w}",
                d.param,
                code=ErrorCode.INVALID_PAIRING,
            )


def loc_mapper(
    query: Item | None = None, *, query_loc: str = "query", **lists: Sequence[Item]
) -> LocMap:
    """Translate an engine error's ``loc`` (``("texts", 3)``) into the request's (``("input", 5)``).

    ``query_loc`` is the engine's name for the single ``query`` (``image`` in ``rank_texts``);
    ``lists`` names the sequences the engine saw (``images=``, ``texts=``).
    """

    def mapping(loc: Loc) -> Loc:
        if query is not None and loc == (query_loc,):
            return query.loc
        match loc:
            case (str(name), int(index)) if index < len(lists.get(name, ())):
                return lists[name][index].loc
        return loc

    return mapping
