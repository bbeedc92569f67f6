"""``/v1/embeddings``: OpenAI's embeddings API over texts and images (one ITC space for both).

:func:`embed_items` is what every embeddings shape runs (``/v2/embed``, Cohere's, and
``/v1/multimodalembeddings``, Voyage's, are routes over it)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.engine import TextFeatures
from blipitm.engine.jobs import EmbedImages, EmbedTexts
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS, APIError, ErrorCode
from blipitm.server.inputs import ImageItem, Item, TextItem, embedding_items, loc_mapper
from blipitm.server.responses import usage
from blipitm.server.schemas import EmbeddingRequest, EmbeddingResponse

router = APIRouter()


@dataclass(frozen=True)
class Embedded:
    """A request's embeddings ``[N, E]`` float32 in item order, with what computing them read."""

    vectors: np.ndarray
    text_tokens: int  # as the engine counted them
    images: int


async def embed_items(ctx: RequestContext[Any], items: Sequence[Item]) -> Embedded:
    """Embed texts and images (one ITC space) through the engine's jobs: the texts in one
    ``EmbedTexts``, the images in one ``EmbedImages``, each merged with other requests'."""
    text_pos = [i for i, it in enumerate(items) if isinstance(it, TextItem)]
    image_pos = [i for i, it in enumerate(items) if isinstance(it, ImageItem)]
    text_items = [it for it in items if isinstance(it, TextItem)]
    image_items = [it for it in items if isinstance(it, ImageItem)]
    texts, images = await ctx.inputs(text_items, image_items)
    vectors = np.empty((len(items), ctx.engine.embedding_dim), dtype=np.float32)  # [N, E]
    text_tokens = 0
    if texts:
        encoded: TextFeatures = await ctx.run(
            EmbedTexts(texts), loc_mapper(texts=text_items), texts=len(texts), images=0
        )
        vectors[text_pos] = encoded.embeddings
        text_tokens = int(encoded.text_tokens.sum())
    if images:
        vectors[image_pos] = await ctx.run(
            EmbedImages(images), loc_mapper(images=image_items), texts=0, images=len(images)
        )
    return Embedded(vectors, text_tokens, len(images))


def check_dimension(ctx: RequestContext[Any], value: int | None, param: str) -> None:
    """OpenAI's ``dimensions``, Cohere's and Voyage's ``output_dimension``: the size or none."""
    dim = ctx.engine.embedding_dim
    if value is not None and value != dim:
        raise APIError(
            400,
            f"this model's embeddings have {dim} dimensions; `{param}` must be {dim} or omitted",
            code=ErrorCode.UNSUPPORTED_DIMENSIONS,
            param=param,
        )


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        # What OpenAI's SDKs decode: the raw little-endian float32 bytes, base64-encoded.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    out: list[float] = vector.tolist()  # the same Python floats as float(x) each, in C
    return out


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=API_ERRORS)
async def embeddings(
    ctx: Annotated[RequestContext[EmbeddingRequest], ready(EmbeddingRequest)],
) -> JSONResponse:
    """OpenAI embeddings of texts or images (unit-norm ITC embeddings, one space for both)."""
    body, settings = ctx.body, ctx.state.settings
    check_dimension(ctx, body.dimensions, "dimensions")
    items = embedding_items(body.input, modality=body.modality, max_items=settings.max_items)
    done = await embed_items(ctx, items)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(done.vectors)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": ctx.model_name,
            "usage": usage(ctx, done.text_tokens, done.images),
        }
    )
