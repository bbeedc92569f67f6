"""``/v2/embed``: Cohere's Embed v2 over texts and images (one ITC space), every embedding type.

``texts``, ``images`` or ``inputs`` (each one text or one image part) become request items and
go through :func:`~blipitm.server.routes.embeddings.embed_items` as on ``/v1/embeddings``; the
integer types are :mod:`blipitm.server.quantize`'s. ``input_type`` is checked and changes
nothing: the model has one embedding of a text, whatever it is used for.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS, APIError, ErrorCode
from blipitm.server.inputs import ImageItem, Item, TextItem, check_count, embed_input_item
from blipitm.server.quantize import as_base64, as_lists, quantize
from blipitm.server.responses import usage
from blipitm.server.routes.embeddings import check_dimension, embed_items
from blipitm.server.schemas import EmbedRequest, EmbedResponse

router = APIRouter()

Context = Annotated[RequestContext[EmbedRequest], ready(EmbedRequest)]
SOURCES = ("texts", "images", "inputs")


def _items(body: EmbedRequest, max_items: int) -> list[Item]:
    """Exactly one of ``texts`` (every string a text), ``images`` (every string an image) and
    ``inputs``, as request items."""
    given = [name for name in SOURCES if getattr(body, name) is not None]
    if len(given) != 1:
        got = f"; got {' and '.join(given)}" if given else ""
        raise APIError(
            400,
            f"give exactly one of texts, images or inputs{got}",
            code=ErrorCode.INVALID_INPUT,
            param=given[1] if given else "texts",
        )
    name = given[0]
    values: list[Any] = getattr(body, name)
    check_count(len(values), max_items, name)
    if name == "texts":
        return [TextItem(t, ("texts", i)) for i, t in enumerate(values)]
    if name == "images":
        return [ImageItem(s, ("images", i)) for i, s in enumerate(values)]
    return [embed_input_item(v, ("inputs", i)) for i, v in enumerate(values)]


def _check_text_options(ctx: RequestContext[EmbedRequest]) -> None:
    """``truncate`` and ``max_tokens``: what the protocol does to long texts is what happens
    (docs/server.md); a request for anything else is refused, not silently changed."""
    body, engine = ctx.body, ctx.engine
    if body.truncate == "START":
        raise APIError(
            400,
            "truncate=START is not supported: texts keep their start (END) as the model reads "
            "them; use END or NONE",
            code=ErrorCode.UNSUPPORTED_INPUT,
            param="truncate",
        )
    limit = engine.protocol.max_text_tokens or engine.config.text.max_position_embeddings
    if body.max_tokens is not None and body.max_tokens < limit:
        raise APIError(
            400,
            f"this model reads at most {limit} tokens of a text and truncates no further; "
            f"max_tokens must be at least {limit} or omitted",
            code=ErrorCode.INVALID_INPUT,
            param="max_tokens",
        )


def _embedding_types(body: EmbedRequest, max_items: int) -> list[str]:
    if body.embedding_types is None:
        return ["float"]
    check_count(len(body.embedding_types), max_items, "embedding_types")
    return list(dict.fromkeys(body.embedding_types))  # each once, in the order asked


def _by_type(vectors: Any, types: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in types:
        if kind == "base64":
            out[kind] = [as_base64(v) for v in quantize(vectors, "float")]
        else:
            out[kind] = as_lists(quantize(vectors, kind))
    return out


@router.post("/v2/embed", response_model=EmbedResponse, responses=API_ERRORS)
async def embed_v2(ctx: Context) -> JSONResponse:
    """Cohere Embed v2: texts, images or single-part inputs, in the embedding types asked for
    (unit-norm ITC embeddings, one space for texts and images)."""
    body = ctx.body
    check_dimension(ctx, body.output_dimension, "output_dimension")
    _check_text_options(ctx)
    max_items = ctx.state.settings.max_items
    types = _embedding_types(body, max_items)
    items = _items(body, max_items)
    done = await embed_items(ctx, items)
    tokens = usage(ctx, done.text_tokens, done.images)["total_tokens"]
    out: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "response_type": "embeddings_by_type",
        "embeddings": _by_type(done.vectors, types),
    }
    if body.texts is not None:
        out["texts"] = body.texts
    out["meta"] = {
        "api_version": {"version": "2"},
        "billed_units": {
            "input_tokens": tokens,
            "text_tokens": done.text_tokens,
            "image_tokens": tokens - done.text_tokens,
            "images": done.images,
        },
    }
    return JSONResponse(out)
