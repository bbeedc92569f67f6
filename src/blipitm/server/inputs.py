"""Request items: which are texts and which are images, and how score / rerank pair them.

Pure functions over the parsed request models, so the rules (vLLM's 1:1 / 1:N / N:N pairing, the
data-URI rule for plain strings, the one-image-one-text rule of ITM) are unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from blipitm.engine.batcher import LocMap
from blipitm.errors import Loc, format_loc
from blipitm.server.errors import APIError, ErrorCode, from_validation_errors
from blipitm.server.images import is_image_data_uri
from blipitm.server.schemas import (
    Content,
    EmbedImagePart,
    EmbedInput,
    ImageDocument,
    ImageURLPart,
    MultimodalInput,
    TextDocument,
    TextPart,
    VoyageImageBase64Part,
    VoyageImageURLPart,
    VoyageTextPart,
    VoyageVideoPart,
)


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


def one_part(content: Sequence[Any], loc: Loc, kinds: Mapping[str, type[BaseModel]]) -> BaseModel:
    """The one part of a multimodal input ``{"content": [part]}`` at ``loc``, validated as the
    model its ``type`` names. Several parts are refused: this model embeds a text or an image,
    and has no fused embedding of both (nor an average we could call one)."""
    param = format_loc((*loc, "content"))
    if not content:
        raise _bad("must contain one part (a text or an image)", param)
    if len(content) > 1:
        raise _bad(
            f"this input has {len(content)} parts; this model embeds one text or one image and "
            "has no fused embedding of several parts: send each part as an input of its own",
            param,
            code=ErrorCode.UNSUPPORTED_INPUT,
        )
    part, where = content[0], (*loc, "content", 0)
    kind = part.get("type") if isinstance(part, dict) else None
    model = kinds.get(kind) if isinstance(kind, str) else None
    if model is None:
        names = ", ".join(repr(k) for k in kinds)
        msg = f"a part is an object whose type is one of {names}"
        raise from_validation_errors([{"loc": (*where, "type"), "msg": msg, "type": "part"}])
    try:
        return model.model_validate(part)
    except ValidationError as e:
        errors = [{**err, "loc": (*where, *err["loc"])} for err in e.errors()]
        raise from_validation_errors(errors) from None


EMBED_PARTS: dict[str, type[BaseModel]] = {"text": TextPart, "image_url": EmbedImagePart}
VOYAGE_PARTS: dict[str, type[BaseModel]] = {
    "text": VoyageTextPart,
    "image_url": VoyageImageURLPart,
    "image_base64": VoyageImageBase64Part,
    "video_url": VoyageVideoPart,
    "video_base64": VoyageVideoPart,
}


def embed_input_item(value: EmbedInput, loc: Loc) -> Item:
    """One input of Cohere's ``/v2/embed``: its text, or its image."""
    part = one_part(value.content, loc, EMBED_PARTS)
    where = (*loc, "content", 0)
    if isinstance(part, TextPart):
        return TextItem(part.text, where)
    assert isinstance(part, EmbedImagePart)
    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
    return ImageItem(url, where)


def multimodal_input_item(value: MultimodalInput, loc: Loc) -> Item:
    """One input of Voyage's ``/v1/multimodalembeddings``: its text, or its image."""
    part = one_part(value.content, loc, VOYAGE_PARTS)
    where = (*loc, "content", 0)
    if isinstance(part, VoyageTextPart):
        return TextItem(part.text, where)
    if isinstance(part, VoyageImageURLPart):
        return ImageItem(part.image_url, where)
    if isinstance(part, VoyageImageBase64Part):
        if part.image_base64[:5].lower() != "data:":
            raise _bad(
                "image_base64 must be a data URI (data:image/...;base64,...); send a URL as an "
                "image_url part",
                format_loc((*where, "image_base64")),
                code=ErrorCode.INVALID_IMAGE,
            )
        return ImageItem(part.image_base64, where)
    raise _bad(
        "this model embeds texts and images, not videos",
        format_loc(where),
        code=ErrorCode.UNSUPPORTED_INPUT,
    )


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
