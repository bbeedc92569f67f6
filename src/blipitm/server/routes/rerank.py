"""``/v1/rerank`` and ``/v2/rerank``: Cohere / Jina rerank across modalities."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.engine import PairScores, Ranking
from blipitm.processing import ResizedImage
from blipitm.server.batching import LocMap, Rank, ScorePairs
from blipitm.server.context import Ready, ready
from blipitm.server.errors import API_ERRORS, APIError
from blipitm.server.inputs import (
    ImageItem,
    Item,
    TextItem,
    check_count,
    check_rerank_modalities,
    classify,
    loc_mapper,
    side_items,
)
from blipitm.server.schemas import RerankRequest, RerankResponse

router = APIRouter()

Context = Annotated[Ready[RerankRequest], ready(RerankRequest)]
Hit = tuple[int, float, float]  # (document index, ITM probability, ITC cosine)
Hits = tuple[list[Hit], int]  # and the tokens the engine read for the request's texts


def _document(item: Item) -> dict[str, Any]:
    if isinstance(item, TextItem):
        return {"text": item.text}
    return {"multi_modal": {"type": "image_url", "image_url": {"url": item.source}}}


def _check_limits(body: RerankRequest) -> None:
    if body.top_n is not None and body.top_n < 0:
        raise APIError(400, "must be >= 0 (0: all)", code="invalid_input", param="top_n")
    if body.rerank_k is not None and body.rerank_k < 1:
        raise APIError(400, "must be >= 1", code="invalid_input", param="rerank_k")


async def _score_all(
    ctx: Ready[RerankRequest],
    image_query: bool,
    texts: list[str],
    images: list[ResizedImage],
    fields: LocMap,
) -> Hits:
    """Every document gets the ITM pass: a plain pair job, which merges with other requests'."""
    n = len(texts) if image_query else len(images)
    pairs = [(0, j) for j in range(n)] if image_query else [(j, 0) for j in range(n)]
    scores: PairScores = await ctx.run(ScorePairs(images, texts, pairs), fields)
    hits = [(j, float(scores.itm_probability[j]), float(scores.itc_cosine[j])) for j in range(n)]
    return hits, int(scores.text_tokens.sum())


async def _score_cut(
    ctx: Ready[RerankRequest],
    query: Item,
    docs: list[Item],
    texts: list[str],
    images: list[ResizedImage],
    rerank_k: int,
) -> Hits:
    """BLIP's two-stage cut: only the ``rerank_k`` best by ITC cosine get the ITM pass."""
    if isinstance(query, ImageItem):
        job = Rank(images[0], texts, rerank_k, image_query=True)
        fields = loc_mapper(query, query_loc="image", texts=docs)
    else:
        job = Rank(texts[0], images, rerank_k, image_query=False)
        fields = loc_mapper(query, query_loc="text", images=docs)
    kept: Ranking = await ctx.run(job, fields)
    return [(r.index, r.itm_probability, r.itc_cosine) for r in kept], kept.text_tokens


async def _rerank(ctx: Ready[RerankRequest]) -> JSONResponse:
    body = ctx.body
    _check_limits(body)
    query = classify(body.query, ("query",))
    docs = side_items(body.documents, "documents")
    check_count(len(docs), ctx.state.settings.max_items, "documents")
    check_rerank_modalities(query, docs)
    text_items = [d for d in [query, *docs] if isinstance(d, TextItem)]
    image_items = [d for d in [query, *docs] if isinstance(d, ImageItem)]
    texts, images = await ctx.inputs(text_items, image_items)
    if body.rerank_k is None or body.rerank_k >= len(docs):
        fields = loc_mapper(images=image_items, texts=text_items)
        ranked, text_tokens = await _score_all(
            ctx, isinstance(query, ImageItem), texts, images, fields
        )
    else:
        ranked, text_tokens = await _score_cut(ctx, query, docs, texts, images, body.rerank_k)
    ranked.sort(key=lambda r: (-r[1], r[0]))
    if body.top_n:
        ranked = ranked[: body.top_n]
    results = [
        {"index": index, "relevance_score": probability, "itc_cosine": cosine}
        | ({"document": _document(docs[index])} if body.return_documents else {})
        for index, probability, cosine in ranked
    ]
    tokens = ctx.usage_tokens(text_tokens, len(images))
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": ctx.state.settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
    )


_RERANK_DOC = (
    "Cohere / Jina rerank: a text query ranks images, an image query ranks texts; "
    "relevance_score is the ITM probability, results best first."
)


@router.post(
    "/v1/rerank", response_model=RerankResponse, responses=API_ERRORS, description=_RERANK_DOC
)
async def rerank_v1(ctx: Context) -> JSONResponse:
    return await _rerank(ctx)


@router.post(
    "/v2/rerank", response_model=RerankResponse, responses=API_ERRORS, description=_RERANK_DOC
)
async def rerank_v2(ctx: Context) -> JSONResponse:
    return await _rerank(ctx)
