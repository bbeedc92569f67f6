"""OpenAI's Files and Batches routes, as the stock ``openai`` SDK calls them.

A key sees, reads, deletes and cancels only its own files and batches (another's answer 404, as
if they did not exist); operator keys and open servers see all of them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from blipitm.server.account import account_of
from blipitm.server.batch.lines import ENDPOINTS
from blipitm.server.batch.runner import BatchRunner
from blipitm.server.batch.store import ACTIVE, Batch, BatchStore, FileRecord, new_id
from blipitm.server.batch.upload import receive_upload
from blipitm.server.errors import APIError, ErrorCode, error_responses
from blipitm.server.settings import ServerSettings

WINDOW_S = {"24h": 24 * 3600}


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str


class FileList(BaseModel):
    object: str = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: str = "file"
    deleted: bool


class BatchObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    request_counts: dict[str, int]


class BatchList(BaseModel):
    object: str = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(max_length=100)
    endpoint: str = Field(description="one of " + ", ".join(ENDPOINTS))
    completion_window: str = Field(description='"24h"')
    metadata: dict[str, str] | None = Field(
        None, description="up to 16 pairs; keys up to 64 characters, values up to 512"
    )
    output_expires_after: dict[str, Any] | None = None  # accepted; output files do not expire

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        # Bounded before its items are validated (the same rule as every request list).
        if isinstance(value, dict) and len(value) > 16:
            raise ValueError(f"at most 16 pairs, got {len(value)}")
        if isinstance(value, dict) and any(
            len(str(k)) > 64 or (isinstance(v, str) and len(v) > 512) for k, v in value.items()
        ):
            raise ValueError("keys up to 64 characters, values up to 512")
        return value


def _owner_of(request: Request) -> tuple[str | None, bool]:
    """(owner, sees everyone's)."""
    owner = account_of(request.scope).owner
    return owner, owner is None


def _own_file(store: BatchStore, request: Request, file_id: str) -> FileRecord:
    owner, everyone = _owner_of(request)
    record = store.file(file_id)
    if record is None or not (everyone or record.owner == owner):
        raise APIError(404, f"no file {file_id!r}", code=ErrorCode.NOT_FOUND, param="file_id")
    return record


def _own_batch(store: BatchStore, request: Request, batch_id: str) -> Batch:
    owner, everyone = _owner_of(request)
    batch = store.batch(batch_id)
    if batch is None or not (everyone or batch.owner == owner):
        raise APIError(404, f"no batch {batch_id!r}", code=ErrorCode.NOT_FOUND, param="batch_id")
    return batch


def _check_request(
    store: BatchStore, body: BatchRequest, owner: str | None, everyone: bool, max_active: int
) -> FileRecord:
    """The batch's input file, once the request and the owner's running batches allow it."""
    if body.endpoint not in ENDPOINTS:
        raise APIError(
            400,
            f"`endpoint` must be one of {', '.join(ENDPOINTS)}",
            code=ErrorCode.INVALID_INPUT,
            param="endpoint",
        )
    if body.completion_window not in WINDOW_S:
        raise APIError(
            400,
            '`completion_window` must be "24h"',
            code=ErrorCode.INVALID_INPUT,
            param="completion_window",
        )
    source = store.file(body.input_file_id)
    if source is None or not (everyone or source.owner == owner) or source.purpose != "batch":
        raise APIError(
            404,
            f"no batch input file {body.input_file_id!r} (upload one with purpose 'batch')",
            code=ErrorCode.NOT_FOUND,
            param="input_file_id",
        )
    active = [b for b in store.batches(owner, everyone=False) if b.status in ACTIVE]
    if len(active) >= max_active:
        raise APIError(
            429,
            f"this key has {len(active)} batches running, the most it may "
            f"(--batch-max-active); wait for one to finish",
            code=ErrorCode.RATE_LIMIT_EXCEEDED,
            headers={"Retry-After": "60"},
        )
    return source


def router_for(store: BatchStore, runner: BatchRunner, settings: ServerSettings) -> APIRouter:
    router = APIRouter(tags=["batch"])
    router.include_router(_files_router(store, settings))
    router.include_router(_batches_router(store, runner, settings))
    return router


def _files_router(store: BatchStore, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/files", response_model=FileObject, responses=error_responses(400, 401, 413, 415)
    )
    async def create_file(request: Request) -> JSONResponse:
        """Upload a JSONL file of batch requests (multipart: ``file``, ``purpose="batch"``)."""
        owner, _ = _owner_of(request)
        file_id = new_id("file")
        tmp = store.files_dir / f".{file_id}.part"
        upload = await receive_upload(
            request,
            tmp,
            max_bytes=settings.batch_max_file_bytes,
            max_lines=settings.batch_max_file_lines,
        )
        assert upload.path is not None
        purpose = upload.fields.get("purpose")
        if purpose != "batch":
            upload.path.unlink(missing_ok=True)
            raise APIError(
                400,
                f"`purpose` must be 'batch' (the only files this server takes), got {purpose!r}",
                code=ErrorCode.INVALID_INPUT,
                param="purpose",
            )
        target = store.files_dir / f"{file_id}.jsonl"
        upload.path.rename(target)
        record = FileRecord(
            file_id, owner, purpose, upload.filename, upload.bytes, upload.lines,
            int(time.time()), str(target),
        )  # fmt: skip
        store.add_file(record)
        return JSONResponse(record.as_api())

    @router.get("/v1/files", response_model=FileList, responses=error_responses(401))
    async def list_files(
        request: Request, purpose: Annotated[str | None, Query(max_length=32)] = None
    ) -> JSONResponse:
        owner, everyone = _owner_of(request)
        records = [f for f in store.files(owner, everyone=everyone) if purpose in (None, f.purpose)]
        return JSONResponse(
            {"object": "list", "data": [f.as_api() for f in records], "has_more": False}
        )

    @router.get(
        "/v1/files/{file_id}", response_model=FileObject, responses=error_responses(401, 404)
    )
    async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse(_own_file(store, request, file_id).as_api())

    @router.get(
        "/v1/files/{file_id}/content",
        response_class=FileResponse,
        responses=error_responses(401, 404),
    )
    async def file_content(request: Request, file_id: str) -> FileResponse:
        record = _own_file(store, request, file_id)
        return FileResponse(record.path, media_type="application/jsonl")

    @router.delete(
        "/v1/files/{file_id}", response_model=FileDeleted, responses=error_responses(401, 404)
    )
    async def delete_file(request: Request, file_id: str) -> JSONResponse:
        record = _own_file(store, request, file_id)
        store.delete_file(file_id)
        os_path = store.files_dir / f"{file_id}.jsonl"
        os_path.unlink(missing_ok=True)
        return JSONResponse({"id": record.id, "object": "file", "deleted": True})

    return router


def _batches_router(store: BatchStore, runner: BatchRunner, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/batches", response_model=BatchObject, responses=error_responses(400, 401, 404, 429)
    )
    async def create_batch(request: Request, body: BatchRequest) -> JSONResponse:
        """Run every line of an uploaded file against ``endpoint``, in the background."""
        owner, everyone = _owner_of(request)
        source = _check_request(store, body, owner, everyone, settings.batch_max_active)
        batch = Batch(
            new_id("batch"), owner, body.endpoint, source.id, body.completion_window,
            metadata=body.metadata,
        )  # fmt: skip
        batch.expires_at = batch.created_at + WINDOW_S[body.completion_window]
        store.save(batch)
        runner.wake()
        return JSONResponse(batch.as_api())

    @router.get(
        "/v1/batches/{batch_id}", response_model=BatchObject, responses=error_responses(401, 404)
    )
    async def retrieve_batch(request: Request, batch_id: str) -> JSONResponse:
        return JSONResponse(_own_batch(store, request, batch_id).as_api())

    @router.get("/v1/batches", response_model=BatchList, responses=error_responses(401))
    async def list_batches(
        request: Request,
        after: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> JSONResponse:
        """Newest first; ``after`` is the last id of the previous page."""
        owner, everyone = _owner_of(request)
        batches = store.batches(owner, everyone=everyone)
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [b.as_api() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(batches) > limit,
            }
        )

    @router.post(
        "/v1/batches/{batch_id}/cancel",
        response_model=BatchObject,
        responses=error_responses(401, 404, 409),
    )
    async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        batch = _own_batch(store, request, batch_id)
        if batch.status not in ACTIVE:
            raise APIError(
                409,
                f"the batch is {batch.status}; only a running batch can be cancelled",
                code=ErrorCode.CONFLICT,
            )
        if batch.status != "cancelling":
            runner.cancel(batch)
        return JSONResponse(batch.as_api())

    return router
