"""``/v1/multimodalembeddings``: Voyage's multimodal embeddings over texts and images.

Each input is one text or one image part; they go through
:func:`~blipitm.server.routes.embeddings.embed_items` as on ``/v1/embeddings``. ``input_type``
is checked and changes nothing (no prompt is prepended: the model has one embedding of a text).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS
from blipitm.server.inputs import check_count, multimodal_input_item
from blipitm.server.quantize import as_base64, quantize
from blipitm.server.responses import usage
from blipitm.server.routes.embeddings import check_dimension, embed_items
from blipitm.server.schemas import MultimodalEmbeddingRequest, MultimodalEmbeddingResponse

router = APIRouter()

Context = Annotated[RequestContext[MultimodalEmbeddingRequest], ready(MultimodalEmbeddingRequest)]


@router.post(
    "/v1/multimodalembeddings", response_model=MultimodalEmbeddingResponse, responses=API_ERRORS
)
async def multimodal_embeddings(ctx: Context) -> JSONResponse:
    """Voyage multimodal embeddings: one text or one image per input (unit-norm ITC embeddings,
    one space for both), as floats or the integer types, optionally base64."""
    body, settings = ctx.body, ctx.state.settings
    check_dimension(ctx, body.output_dimension, "output_dimension")
    check_count(len(body.inputs), settings.max_items, "inputs")
    items = [multimodal_input_item(v, ("inputs", i)) for i, v in enumerate(body.inputs)]
    done = await embed_items(ctx, items)
    tokens = usage(ctx, done.text_tokens, done.images)["total_tokens"]
    rows = quantize(done.vectors, body.output_dtype or "float")
    encoded = "base64" in (body.output_encoding, body.encoding_format)
    data: list[dict[str, Any]] = [
        {"object": "embedding", "embedding": as_base64(r) if encoded else r.tolist(), "index": i}
        for i, r in enumerate(rows)
    ]
    size = ctx.engine.config.vision.image_size
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": ctx.model_name,
            "usage": {
                "text_tokens": done.text_tokens,
                "image_pixels": done.images * size * size,
                "video_pixels": 0,
                "total_tokens": tokens,
            },
        }
    )
