"""The model API: /v1/models, /v1/embeddings, /v1/score, /v1/rerank, /v2/rerank, /v1/search."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from blipitm.engine import PairScores, Ranked
from blipitm.retrieval import IndexFormatError, SearchHit, search
from blipitm.server.batching import Call, EmbedImages, EmbedTexts, Rank, ScorePairs
from blipitm.server.errors import APIError
from blipitm.server.inputs import (
    ImageItem,
    Item,
    TextItem,
    check_count,
    check_rerank_modalities,
    classify,
    embedding_items,
    field_mapper,
    plan_pairs,
    side_items,
)
from blipitm.server.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    SearchRequest,
    SearchResponse,
)
from blipitm.server.settings import public_path
from blipitm.server.state import ServerState

router = APIRouter()


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "invalid input (the `param` names the item)",
        401: "missing or invalid API key",
        404: "unknown model",
        413: "request, item count or image over a limit",
        415: "not JSON, or not an image media type",
        422: "request does not match the schema",
        429: "inference queue full (see Retry-After)",
        503: "model not loaded yet",
        504: "request deadline passed",
    }
    return {c: {"model": ErrorResponse, "description": descriptions[c]} for c in codes}


_API_ERRORS = _errors(400, 401, 404, 413, 415, 422, 429, 503, 504)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blipitm
    return state


# -- /v1/models -----------------------------------------------------------------------------------


def _model_card(st: ServerState) -> dict[str, Any]:
    engine, _, _ = st.require_ready()
    info = engine.info.as_dict()
    return {
        "id": st.settings.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "blipitm",
        "protocol": info["protocol"],
        "embedding_dim": info["embedding_dim"],
        "image_size": info["image_size"],
        "source": info["source"] if st.settings.expose_paths else public_path(info["source"]),
        "revision": info["revision"],
        "commit": info["commit"],
        "device": info["device"],
        "dtype": info["dtype"],
        "overrides": info["overrides"],
    }


@router.get("/v1/models", response_model=ModelList, responses=_errors(401, 503))
async def list_models(request: Request) -> JSONResponse:
    """The served model, in OpenAI's list shape, with its protocol and overrides."""
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404, 503))
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    st = _state(request)
    st.check_model(model)
    return JSONResponse(_model_card(st))


# -- /v1/embeddings -------------------------------------------------------------------------------


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        # What OpenAI's SDKs decode: the raw little-endian float32 bytes, base64-encoded.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_API_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """OpenAI embeddings of texts or images (unit-norm ITC embeddings, one space for both)."""
    st = _state(request)
    st.check_model(body.model)
    engine, batcher, _ = st.require_ready()
    dim = engine.embedding_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(
            400,
            f"this model's embeddings have {dim} dimensions; `dimensions` must be {dim} or omitted",
            code="unsupported_dimensions",
            param="dimensions",
        )
    items = embedding_items(body.input, modality=body.modality, max_items=st.settings.max_items)
    deadline = st.deadline()
    st.check_room(batcher)
    text_pos = [i for i, it in enumerate(items) if isinstance(it, TextItem)]
    image_pos = [i for i, it in enumerate(items) if isinstance(it, ImageItem)]
    text_items = [it for it in items if isinstance(it, TextItem)]
    image_items = [it for it in items if isinstance(it, ImageItem)]
    texts = st.validate_texts(text_items)
    images = await st.load_images(image_items, deadline)
    vectors = np.empty((len(items), dim), dtype=np.float32)
    if texts:
        job = EmbedTexts(texts)
        vectors[text_pos] = await st.run(request, job, field_mapper(texts=text_items), deadline)
    if images:
        job_i = EmbedImages(images)
        vectors[image_pos] = await st.run(
            request, job_i, field_mapper(images=image_items), deadline
        )
    tokens = await st.usage_tokens(texts, len(images))
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": st.settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# -- /v1/score ------------------------------------------------------------------------------------


@router.post("/v1/score", response_model=ScoreResponse, responses=_API_ERRORS)
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    """vLLM's score API: ITM probability (plus logits and ITC cosine) per (text_1, text_2) pair."""
    st = _state(request)
    st.check_model(body.model)
    _, batcher, _ = st.require_ready()
    side1 = side_items(body.text_1, "text_1")
    side2 = side_items(body.text_2, "text_2")
    check_count(len(side1), st.settings.max_items, "text_1")
    check_count(len(side2), st.settings.max_items, "text_2")
    plan = plan_pairs(side1, side2)
    deadline = st.deadline()
    st.check_room(batcher)
    texts = st.validate_texts(plan.texts)
    images = await st.load_images(plan.images, deadline)
    scores: PairScores = await st.run(
        request,
        ScorePairs(images, texts, plan.pairs),
        field_mapper(images=plan.images, texts=plan.texts),
        deadline,
    )
    data = [
        {
            "index": p,
            "object": "score",
            "score": float(scores.itm_probability[p]),
            "itm_probability": float(scores.itm_probability[p]),
            "itm_logits": [float(x) for x in scores.itm_logits[p]],
            "itc_cosine": float(scores.itc_cosine[p]),
        }
        for p in range(len(scores))
    ]
    tokens = await st.usage_tokens(texts, len(images))
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": st.settings.model_name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
    )


# -- /v1/rerank, /v2/rerank -----------------------------------------------------------------------


def _document(item: Item) -> dict[str, Any]:
    if isinstance(item, TextItem):
        return {"text": item.text}
    return {"multi_modal": {"type": "image_url", "image_url": {"url": item.source}}}


async def _rerank(body: RerankRequest, request: Request) -> JSONResponse:
    st = _state(request)
    st.check_model(body.model)
    _, batcher, _ = st.require_ready()
    if body.top_n is not None and body.top_n < 0:
        raise APIError(400, "must be >= 0 (0: all)", code="invalid_input", param="top_n")
    if body.rerank_k is not None and body.rerank_k < 1:
        raise APIError(400, "must be >= 1", code="invalid_input", param="rerank_k")
    query = classify(body.query, "query")
    docs = side_items(body.documents, "documents")
    check_count(len(docs), st.settings.max_items, "documents")
    check_rerank_modalities(query, docs)
    deadline = st.deadline()
    st.check_room(batcher)
    text_items = [d for d in [query, *docs] if isinstance(d, TextItem)]
    image_items = [d for d in [query, *docs] if isinstance(d, ImageItem)]
    texts = st.validate_texts(text_items)
    images = await st.load_images(image_items, deadline)
    image_query = isinstance(query, ImageItem)
    if body.rerank_k is None or body.rerank_k >= len(docs):
        # Every document is scored: a plain pair job, which merges with other requests' pairs.
        pairs = (
            [(0, j) for j in range(len(docs))]
            if image_query
            else [(j, 0) for j in range(len(docs))]
        )
        scores: PairScores = await st.run(
            request,
            ScorePairs(images, texts, pairs),
            field_mapper(images=image_items, texts=text_items),
            deadline,
        )
        ranked = [
            (j, float(scores.itm_probability[j]), float(scores.itc_cosine[j]))
            for j in range(len(docs))
        ]
    else:
        # BLIP's two-stage cut: only the rerank_k best by ITC cosine get the ITM pass.
        if image_query:
            job = Rank(images[0], texts, body.rerank_k, image_query=True)
            fields = field_mapper(query, query_field="image", texts=docs)
        else:
            job = Rank(texts[0], images, body.rerank_k, image_query=False)
            fields = field_mapper(query, query_field="text", images=docs)
        kept: list[Ranked] = await st.run(request, job, fields, deadline)
        ranked = [(r.index, r.itm_probability, r.itc_cosine) for r in kept]
    ranked.sort(key=lambda r: (-r[1], r[0]))
    if body.top_n:
        ranked = ranked[: body.top_n]
    results = []
    for index, probability, cosine in ranked:
        result: dict[str, Any] = {
            "index": index,
            "relevance_score": probability,
            "itc_cosine": cosine,
        }
        if body.return_documents:
            result["document"] = _document(docs[index])
        results.append(result)
    tokens = await st.usage_tokens(texts, len(images))
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": st.settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
    )


_RERANK_DOC = (
    "Cohere / Jina rerank: a text query ranks images, an image query ranks texts; "
    "relevance_score is the ITM probability, results best first."
)


@router.post(
    "/v1/rerank", response_model=RerankResponse, responses=_API_ERRORS, description=_RERANK_DOC
)
async def rerank_v1(body: RerankRequest, request: Request) -> JSONResponse:
    return await _rerank(body, request)


@router.post(
    "/v2/rerank", response_model=RerankResponse, responses=_API_ERRORS, description=_RERANK_DOC
)
async def rerank_v2(body: RerankRequest, request: Request) -> JSONResponse:
    return await _rerank(body, request)


# -- /v1/search -----------------------------------------------------------------------------------

_log = logging.getLogger("blipitm.server")


@router.post(
    "/v1/search",
    response_model=SearchResponse,
    responses=_API_ERRORS,
    description="Search the index given by --index: a text query finds images, an image query "
    "finds captions. Exact ITC top-k over the whole index, then the rerank_k best are scored "
    "with ITM; score = itm_logits[1] + itc_cosine under the BLIP protocol.",
)
async def search_index(body: SearchRequest, request: Request) -> JSONResponse:
    st = _state(request)
    st.check_model(body.model)
    _, batcher, _ = st.require_ready()
    index = st.index
    if index is None:
        raise APIError(
            404,
            "this server has no retrieval index; start it with --index INDEX "
            "(built with `blipitm index build SRC --out INDEX`)",
            code="index_not_configured",
        )
    limit = st.settings.max_items
    if not 1 <= body.top_k <= limit:
        raise APIError(400, f"must be between 1 and {limit}", code="invalid_input", param="top_k")
    if not 0 <= body.rerank_k <= 8 * limit:
        raise APIError(
            400, f"must be between 0 and {8 * limit}", code="invalid_input", param="rerank_k"
        )
    query = classify(body.query, "query")
    deadline = st.deadline()
    st.check_room(batcher)
    if isinstance(query, TextItem):
        texts, images = st.validate_texts([query]), []
        q: Any = texts[0]
    else:
        texts, images = [], await st.load_images([query], deadline)
        q = images[0]
    top_k, rerank_k = body.top_k, body.rerank_k
    try:
        hits: list[SearchHit] = await st.run(
            request,
            Call(lambda engine: search(engine, index, q, top_k=top_k, rerank_k=rerank_k)),
            field_mapper(query, images=[query], texts=[query]),
            deadline,
        )
    except IndexFormatError as e:
        # Damaged on disk since start-up (open checked it): the operator's to fix, and the
        # message names server paths, so the client gets neither a 500 nor the details.
        _log.error("search failed: %s", e)
        raise APIError(
            503,
            "the search index cannot be used: it is damaged (the server log says how); "
            "the operator can check it with `blipitm index verify`",
            code="index_damaged",
        ) from None
    tokens = await st.usage_tokens(texts, len(images))
    return JSONResponse(
        {
            "object": "list",
            "model": st.settings.model_name,
            "data": [{"object": "search_result", **hit.as_dict()} for hit in hits],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
