"""``/v1/models``: the served model, in OpenAI's shape, with its protocol and overrides."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from blipitm.server.account import account_of
from blipitm.server.context import check_access, server_state
from blipitm.server.errors import error_responses
from blipitm.server.schemas import ModelCard, ModelList
from blipitm.server.settings import public_path
from blipitm.server.state import ServerState

router = APIRouter()

State = Annotated[ServerState, Depends(server_state)]


def _model_card(st: ServerState) -> dict[str, Any]:
    info = st.require_ready().engine.info.as_dict()
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


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(st: State, request: Request) -> JSONResponse:
    """The served model, in OpenAI's list shape, with its protocol and overrides (none when the
    API key may not use it)."""
    if not account_of(request.scope).allows(st.settings.model_name, st.settings.model):
        return JSONResponse({"object": "list", "data": []})
    return JSONResponse({"object": "list", "data": [_model_card(st)]})


@router.get(
    "/v1/models/{model:path}", response_model=ModelCard, responses=error_responses(401, 404, 503)
)
async def retrieve_model(model: str, st: State, request: Request) -> JSONResponse:
    st.check_model(model)
    check_access(account_of(request.scope), st, model)
    return JSONResponse(_model_card(st))
