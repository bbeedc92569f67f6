"""``/v1/explain``: Grad-CAM maps of where each caption matches the image (LAVIS's definition).

An explanation costs a forward and a backward pass of the text encoder per caption, so the
captions are queued one at a time: each is a bounded piece of inference work, and other
requests' jobs queued meanwhile run between the pieces instead of waiting for the whole request.
Overlay PNGs are drawn on the I/O threads, not on the inference worker.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from PIL import Image

from blipitm.engine.jobs import Explain
from blipitm.explain import Explanation, overlay, resolve_layer
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS
from blipitm.server.inputs import ImageItem, TextItem, check_count, classify, loc_mapper
from blipitm.server.responses import usage
from blipitm.server.schemas import ExplainRequest, ExplainResponse

router = APIRouter()

PIECE = 1  # captions per inference job


def _tensor(array: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")
    return {"shape": list(array.shape), "dtype": "float32", "data": data}


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _render(e: Explanation, which: str) -> tuple[str | None, list[str] | None]:
    """The overlays asked for, as PNG data URIs (on an I/O thread)."""
    if which == "none":
        return None, None
    caption = _png(overlay(e.image, e.map))
    if which == "caption":
        return caption, None
    return caption, [_png(overlay(e.image, cam)) for cam in e.token_maps]


def _items(body: ExplainRequest) -> tuple[ImageItem, list[TextItem]]:
    item = classify(body.image, ("image",), strings_are_images=True)
    assert isinstance(item, ImageItem)
    if isinstance(body.texts, str):
        return item, [TextItem(body.texts, ("texts",))]
    return item, [TextItem(t, ("texts", i)) for i, t in enumerate(body.texts)]


@router.post("/v1/explain", response_model=ExplainResponse, responses=API_ERRORS)
async def explain(
    ctx: Annotated[RequestContext[ExplainRequest], ready(ExplainRequest)],
) -> JSONResponse:
    """Grad-CAM of the ITM match on one cross-attention layer, per caption, with its scores."""
    body, settings = ctx.body, ctx.state.settings
    config = ctx.engine.config
    num_layers = config.text.num_hidden_layers
    layer = resolve_layer(body.layer, num_layers)  # InvalidInputError: a 400 (server/errors.py)
    image_item, text_items = _items(body)
    # Each caption explained costs a backward pass and image-sized maps: capped as images are.
    check_count(len(text_items), min(settings.max_items, settings.max_images), "texts")
    texts, images = await ctx.inputs(text_items, [image_item])
    found: list[Explanation] = []
    for start in range(0, len(texts), PIECE):
        piece = slice(start, start + PIECE)
        locs = loc_mapper(image_item, query_loc="image", texts=text_items[piece])
        # Billed per caption the worker explains (the image with the first), so a client that
        # leaves pays for the compute it caused and gets the rest back.
        job = Explain(images[0], texts[piece], layer)
        found += await ctx.run(job, locs, texts=len(texts[piece]), images=int(start == 0))
    loop = asyncio.get_running_loop()
    rendered = await asyncio.gather(
        *(loop.run_in_executor(ctx.state.executor, _render, e, body.overlays) for e in found)
    )
    data = [
        {
            "index": i,
            "object": "explanation",
            "text": e.text,
            "tokens": e.tokens,
            "itm_probability": e.itm_probability,
            "itm_logits": [float(x) for x in e.itm_logits],
            "itc_cosine": e.itc_cosine,
            "map": _tensor(e.map),
            "token_maps": _tensor(e.token_maps) if body.token_maps else None,
            "overlay": caption,
            "token_overlays": per_token,
        }
        for i, (e, (caption, per_token)) in enumerate(zip(found, rendered, strict=True))
    ]
    text_tokens = sum(e.text_tokens for e in found)
    return JSONResponse(
        {
            "object": "list",
            "model": ctx.model_name,
            "layer": layer,
            "num_layers": num_layers,
            "grid": config.vision.image_size // config.vision.patch_size,
            "data": data,
            "usage": usage(ctx, text_tokens, 1),
        }
    )
