"""A batch's lines: checked before any work, answered through the app, recorded as they finish.

An input line is OpenAI's ``{"custom_id", "method": "POST", "url", "body"}``; an answer line is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` where ``body``
is what the online endpoint answers for that request: each line is sent through the app itself
(in process, the whole middleware stack: the gateway bills it to the batch's owner), so it is
the same code answering, not a copy of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.server.middleware import ASGIApp, Message

# The endpoints a batch may target (every scoring route; the routes that exist on this server).
ENDPOINTS = (
    "/v1/embeddings",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/explain",
    "/v2/embed",
    "/v1/multimodalembeddings",
    "/v1/chat/completions",
)
MAX_ERRORS = 100  # a failed validation reports this many problems at most


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as OpenAI's errors count them
    custom_id: str
    body: bytes  # the request body, re-serialised


def check_lines(path: Path, endpoint: str) -> tuple[list[dict[str, Any]], int]:
    """(errors, number of lines) of an input file for ``endpoint``: malformed JSON, a missing or
    duplicate ``custom_id``, another ``url``, a method other than POST, a body that is not an
    object. Reads the file as it streams; at most :data:`MAX_ERRORS` errors are listed."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    count = 0
    for number, raw in _numbered(path):
        count += 1
        for code, message in _line_problems(raw, endpoint, seen):
            if len(errors) < MAX_ERRORS:
                errors.append({"code": code, "line": number, "message": message, "param": None})
    if count == 0:
        errors.append({"code": "empty_file", "line": 0, "message": "the file has no lines"})
    return errors, count


def _line_problems(raw: bytes, endpoint: str, seen: set[str]) -> list[tuple[str, str]]:
    """(code, message) of each problem of one line; a good ``custom_id`` joins ``seen``."""
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [("invalid_json_line", f"this line is not valid JSON: {e}")]
    if not isinstance(item, dict):
        return [("invalid_json_line", "each line must be a JSON object")]
    problems = []
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(("missing_required_parameter", "`custom_id` (a string) is required"))
    elif custom_id in seen:
        problems.append(("duplicate_custom_id", f"`custom_id` {custom_id!r} is used twice"))
    else:
        seen.add(custom_id)
    if item.get("method") != "POST":
        problems.append(("invalid_method", "`method` must be POST"))
    if item.get("url") != endpoint:
        problems.append(
            (
                "mismatched_endpoint",
                f"`url` is {item.get('url')!r}; every line of this batch must be {endpoint!r}",
            )
        )
    if not isinstance(item.get("body"), dict):
        problems.append(("invalid_body", "`body` must be a JSON object (the request's body)"))
    return problems


def read_lines(path: Path) -> Iterator[Line]:
    """The lines of a checked input file."""
    for number, raw in _numbered(path):
        item = json.loads(raw)
        yield Line(number, item["custom_id"], json.dumps(item["body"]).encode())


def _numbered(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def answered(path: Path) -> dict[str, dict[str, Any]]:
    """The answer lines already in an output or error file, by ``custom_id``; a torn last line
    (the process died while writing it) is cut off, so that its line runs again."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                item = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[item["custom_id"]] = item
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


class AnswerFile:
    """An output or error file, appended one whole line per write (flushed to the OS at once,
    so a killed process loses at most the line it was writing); fsynced when closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()


def answer(line: Line, status: int, body: Any) -> dict[str, Any]:
    """OpenAI's answer line for ``line``: ``error`` is null when the endpoint answered (even with
    a 4xx: that is the endpoint's answer, in ``response``)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def unanswered(line: Line, code: str, message: str) -> dict[str, Any]:
    """An error line for a line that was never sent (expired, cancelled)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


async def call(app: ASGIApp, path: str, body: bytes, extra: dict[str, Any]) -> tuple[int, Any]:
    """POST ``body`` to ``path`` through ``app`` in process; (status, parsed JSON body). The
    ``extra`` scope entries say who the line is billed to and that it runs in the background;
    no header can set them, as no client can reach this scope."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"batch"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("batch", 0),
        "server": ("batch", 0),
        **extra,
    }
    sent = False
    forever = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()  # the caller never leaves; a cancelled line is cancelled instead
        return {"type": "http.disconnect"}

    status, chunks = 500, []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")
