"""``/v1/rerank`` and ``/v2/rerank``: Cohere / Jina rerank across modalities."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.engine import PairScores, Ranking
from blipitm.engine.batcher import LocMap
from blipitm.engine.jobs import Rank, ScorePairs
from blipitm.processing import ResizedImage
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS, APIError, ErrorCode
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
from blipitm.server.responses import usage
from blipitm.server.schemas import Content, FieldsDocument, RerankRequest, RerankResponse

router = APIRouter()

Context = Annotated[RequestContext[RerankRequest], ready(RerankRequest)]
Hit = tuple[int, float, float]  # (document index, ITM probability, ITC cosine)
Hits = tuple[list[Hit], int]  # and the tokens the engine read for the request's texts


def _item(doc: object, index: int, rank_fields: list[str] | None) -> Item:
    """One document; a Cohere document object is the text of its ``rank_fields`` (in that
    order, joined by spaces) or of its ``text``."""
    loc = ("documents", index)
    if not isinstance(doc, FieldsDocument):
        return classify(doc, loc)
    fields = rank_fields or ["text"]
    values = doc.model_dump(exclude_none=True)
    found = [values[f] for f in fields if values.get(f)]
    if not found:
        raise APIError(
            400,
            f"the document has none of the fields ranked ({', '.join(fields)}); name them with "
            "rank_fields",
            code=ErrorCode.INVALID_INPUT,
            param=f"documents[{index}]",
        )
    return TextItem(" ".join(found), loc)


def _documents(body: RerankRequest) -> list[Item]:
    if isinstance(body.documents, Content):
        return side_items(body.documents, "documents")
    return [_item(d, i, body.rank_fields) for i, d in enumerate(body.documents)]


def _returned(body: RerankRequest, v2: bool) -> Callable[[int, Item], dict[str, Any] | None]:
    """Which documents a result carries, and how. Asked (``return_documents: true``): every one,
    as ``{"text": ...}`` (what Cohere's and litellm's clients parse) holding the text, or the
    image reference as sent. Unasked: text documents on /v1 (Jina's default), none on /v2
    (Cohere's); images never, so no base64 image is echoed that the client did not ask for."""
    asked = body.return_documents
    raw = body.documents if isinstance(body.documents, list) else None

    def document(index: int, item: Item) -> dict[str, Any] | None:
        if asked is False or (asked is None and (v2 or isinstance(item, ImageItem))):
            return None
        text = item.text if isinstance(item, TextItem) else item.source
        doc = raw[index] if raw is not None else None
        extra = doc.model_dump(exclude_none=True) if isinstance(doc, FieldsDocument) else {}
        return {"text": text, **extra}

    return document


def _check_limits(body: RerankRequest) -> None:
    if body.top_n is not None and body.top_n < 0:
        raise APIError(400, "must be >= 0 (0: all)", code=ErrorCode.INVALID_INPUT, param="top_n")
    if body.rerank_k is not None and body.rerank_k < 1:
        raise APIError(400, "must be >= 1", code=ErrorCode.INVALID_INPUT, param="rerank_k")


async def _score_all(
    ctx: RequestContext[RerankRequest],
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
    ctx: RequestContext[RerankRequest],
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


async def _rerank(ctx: RequestContext[RerankRequest], *, v2: bool) -> JSONResponse:
    body = ctx.body
    _check_limits(body)
    query = classify(body.query, ("query",))
    docs = _documents(body)
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
    document = _returned(body, v2)
    results: list[dict[str, Any]] = []
    for index, probability, cosine in ranked:
        result: dict[str, Any] = {"index": index, "relevance_score": probability}
        result["itc_cosine"] = cosine
        if (doc := document(index, docs[index])) is not None:
            result["document"] = doc
        results.append(result)
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": ctx.model_name,
            "usage": usage(ctx, text_tokens, len(images)),
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
    return await _rerank(ctx, v2=False)


@router.post(
    "/v2/rerank", response_model=RerankResponse, responses=API_ERRORS, description=_RERANK_DOC
)
async def rerank_v2(ctx: Context) -> JSONResponse:
    return await _rerank(ctx, v2=True)
