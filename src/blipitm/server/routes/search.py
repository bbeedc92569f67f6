"""``/v1/search``: two-stage retrieval over the index given by ``--index``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.retrieval import Index, IndexFormatError, SearchHits, modality_problem, search
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS, APIError, ErrorCode
from blipitm.server.inputs import TextItem, classify, loc_mapper
from blipitm.server.responses import usage
from blipitm.server.schemas import SearchRequest, SearchResponse

if TYPE_CHECKING:
    from blipitm.engine import Engine  # torch: loaded when the app loads a model, not on import

router = APIRouter()

_log = logging.getLogger("blipitm.server")


@dataclass(frozen=True)
class Search:
    """The job: both stages of one query over the index, on the inference worker (never merged).
    It lives with its route, not in ``engine/jobs.py``: the index is the retrieval layer's, below
    the engine."""

    index: Index
    query: Any  # a text, or a resized image
    top_k: int
    rerank_k: int

    def run(self, engine: Engine) -> SearchHits:
        return search(engine, self.index, self.query, top_k=self.top_k, rerank_k=self.rerank_k)


def _checked_index(ctx: RequestContext[SearchRequest]) -> Index:
    """The request's model's index, once ``top_k`` and ``rerank_k`` are within the server's
    limits."""
    index = ctx.loaded.index
    if index is None:
        raise APIError(
            404,
            f"the model {ctx.model_name!r} has no retrieval index; start the server with --index "
            "INDEX, or give the model an `index` in the models file (an index is built with "
            "`blipitm index build SRC --out INDEX`)",
            code=ErrorCode.INDEX_NOT_CONFIGURED,
        )
    limit = ctx.state.settings.max_items
    if not 1 <= ctx.body.top_k <= limit:
        raise APIError(
            400, f"must be between 1 and {limit}", code=ErrorCode.INVALID_INPUT, param="top_k"
        )
    if not 0 <= ctx.body.rerank_k <= 8 * limit:
        raise APIError(
            400,
            f"must be between 0 and {8 * limit}",
            code=ErrorCode.INVALID_INPUT,
            param="rerank_k",
        )
    return index


def _damaged(e: IndexFormatError) -> APIError:
    """Damaged on disk since start-up (open checked it): the operator's to fix, and the message
    names server paths, so the client gets neither a 500 nor the details."""
    _log.error("search failed: %s", e)
    return APIError(
        503,
        "the search index cannot be used: it is damaged (the server log says how); "
        "the operator can check it with `blipitm index verify`",
        code=ErrorCode.INDEX_DAMAGED,
    )


@router.post(
    "/v1/search",
    response_model=SearchResponse,
    responses=API_ERRORS,
    description="Search the index given by --index: a text query finds images, an image query "
    "finds captions. Exact ITC top-k over the whole index, then the rerank_k best are scored "
    "with ITM; score = itm_logits[1] + itc_cosine under the BLIP protocol.",
)
async def search_index(
    ctx: Annotated[RequestContext[SearchRequest], ready(SearchRequest)],
) -> JSONResponse:
    index = _checked_index(ctx)
    query = classify(ctx.body.query, ("query",))
    # Before the query is decoded or queued: an index of images cannot answer an image query.
    try:
        problem = modality_problem(index, text_query=isinstance(query, TextItem))
    except IndexFormatError as e:
        raise _damaged(e) from None
    if problem is not None:
        raise APIError(400, problem, code=ErrorCode.INVALID_INPUT, param="query")
    if isinstance(query, TextItem):
        texts, images = await ctx.inputs([query], [])
    else:
        texts, images = await ctx.inputs([], [query])
    q: Any = texts[0] if texts else images[0]
    try:
        hits: SearchHits = await ctx.run(
            Search(index, q, ctx.body.top_k, ctx.body.rerank_k),
            loc_mapper(query, images=[query], texts=[query]),
        )
    except IndexFormatError as e:
        raise _damaged(e) from None
    return JSONResponse(
        {
            "object": "list",
            "model": ctx.model_name,
            "data": [{"object": "search_result", **hit.as_dict()} for hit in hits],
            "usage": usage(ctx, hits.text_tokens, len(images)),
        }
    )
