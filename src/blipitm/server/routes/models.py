"""``/v1/models``: the served models, in OpenAI's shape, with each one's status, names, price,
protocol and overrides."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from blipitm.server.account import account_of
from blipitm.server.context import check_access, registry_of, server_state
from blipitm.server.errors import error_responses
from blipitm.server.registry import ServedModel
from blipitm.server.schemas import ModelCard, ModelList
from blipitm.server.settings import public_path
from blipitm.server.state import ServerState

router = APIRouter()

State = Annotated[ServerState, Depends(server_state)]


def _model_card(st: ServerState, model: ServedModel) -> dict[str, Any]:
    spec, expose = model.spec, st.settings.expose_paths
    aliases = [a for a in spec.names[1:] if expose or a == public_path(a)]
    card: dict[str, Any] = {
        "id": model.name,
        "object": "model",
        "created": st.created,
        "owned_by": "blipitm",
        "kind": model.kind,
        "default": model.default,
        "aliases": aliases,
        "status": model.status,
        # A load error names files on the server; the operator has it in the log.
        "error": None
        if model.error is None
        else (model.error if expose else "the model failed to load; the server log says why"),
        "price": {"text": spec.price.text, "image": spec.price.image},
        "protocol": spec.load.protocol,
        "source": str(spec.load.source) if expose else public_path(str(spec.load.source)),
        "device": spec.load.device,
        "dtype": spec.load.dtype,
        "embedding_dim": None,
        "image_size": None,
        "revision": spec.load.revision,
        "commit": None,
        "overrides": None,
    }
    if model.loaded is not None:
        info = model.loaded.engine.info.as_dict()
        for name in ("embedding_dim", "image_size", "revision", "commit", "device", "dtype"):
            card[name] = info[name]
        card["overrides"] = info["overrides"]
    return card


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(st: State, request: Request) -> JSONResponse:
    """The served models the API key may use, the default first, loaded or not."""
    account = account_of(request.scope)
    cards = [_model_card(st, m) for m in registry_of(st).models if account.allows(*m.spec.names)]
    return JSONResponse({"object": "list", "data": cards})


@router.get(
    "/v1/models/{model:path}", response_model=ModelCard, responses=error_responses(401, 404, 503)
)
async def retrieve_model(model: str, st: State, request: Request) -> JSONResponse:
    served = registry_of(st).resolve(model)
    check_access(account_of(request.scope), served, model)
    return JSONResponse(_model_card(st, served))
