"""``/v1/score``: vLLM's score API, one image and one text per pair."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from blipitm.engine import PairScores
from blipitm.engine.jobs import ScorePairs
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS
from blipitm.server.inputs import check_count, loc_mapper, plan_pairs, side_items
from blipitm.server.responses import usage
from blipitm.server.schemas import ScoreRequest, ScoreResponse

router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse, responses=API_ERRORS)
async def score(ctx: Annotated[RequestContext[ScoreRequest], ready(ScoreRequest)]) -> JSONResponse:
    """vLLM's score API: ITM probability (plus logits and ITC cosine) per (text_1, text_2) pair."""
    body, settings = ctx.body, ctx.state.settings
    side1 = side_items(body.text_1, "text_1")
    side2 = side_items(body.text_2, "text_2")
    check_count(len(side1), settings.max_items, "text_1")
    check_count(len(side2), settings.max_items, "text_2")
    plan = plan_pairs(side1, side2)
    texts, images = await ctx.inputs(plan.texts, plan.images)
    scores: PairScores = await ctx.run(
        ScorePairs(images, texts, plan.pairs),
        loc_mapper(images=plan.images, texts=plan.texts),
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
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": ctx.model_name,
            "data": data,
            "usage": usage(ctx, int(scores.text_tokens.sum()), len(images), completion_tokens=True),
        }
    )
