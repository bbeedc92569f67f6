"""``POST /v1/files``: a multipart upload streamed to disk, under a size and a line cap.

The body is parsed as it arrives (python-multipart's streaming parser), the ``file`` part written
straight to a temporary file in the store, so memory stays bounded at any size; over a cap, the
upload stops with 413 and the partial file is removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from blipitm.server.errors import APIError, ErrorCode

MAX_FIELD_BYTES = 1024  # `purpose` and any other small field


@dataclass
class Upload:
    path: Path | None = None  # the file part, on disk
    filename: str = "upload.jsonl"
    bytes: int = 0
    lines: int = 0
    fields: dict[str, str] = field(default_factory=dict)


class _Parts:
    """The parser's callbacks: headers of each part, its data to disk or to a small field."""

    def __init__(self, tmp: Path, max_bytes: int, max_lines: int) -> None:
        self.tmp, self.max_bytes, self.max_lines = tmp, max_bytes, max_lines
        self.upload = Upload()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._out: IO[bytes] | None = None
        self._value = b""
        self._last = b"\n"

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _begin(self) -> None:
        self._headers, self._name, self._value = {}, "", b""

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode(errors="replace")
        if self._name == "file":
            filename = options.get(b"filename", b"").decode(errors="replace")
            self.upload.filename = os.path.basename(filename) or self.upload.filename
            self.upload.path = self.tmp
            self._out = open(self.tmp, "wb")  # noqa: SIM115 (closed in _end / close)

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._out is None:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise APIError(
                    400, "form field too long", code=ErrorCode.INVALID_INPUT, param=self._name
                )
            return
        self.upload.bytes += len(chunk)
        if self.upload.bytes > self.max_bytes:
            raise APIError(
                413,
                f"the file is larger than the limit of {self.max_bytes} bytes "
                "(--batch-max-file-bytes); split it into several batches",
                code=ErrorCode.REQUEST_TOO_LARGE,
                param="file",
            )
        self.upload.lines += chunk.count(b"\n")
        if chunk:
            self._last = chunk[-1:]
        if self.upload.lines > self.max_lines:
            raise APIError(
                413,
                f"the file has more than {self.max_lines} lines (--batch-max-file-lines); split "
                "it into several batches",
                code=ErrorCode.TOO_MANY_ITEMS,
                param="file",
            )
        self._out.write(chunk)

    def _end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            if self._last != b"\n" and self.upload.bytes:
                self.upload.lines += 1  # a last line without its newline
        else:
            self.upload.fields[self._name] = self._value.decode(errors="replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def receive_upload(request: Request, tmp: Path, *, max_bytes: int, max_lines: int) -> Upload:
    """The form of ``request`` with its ``file`` part at ``tmp``; removes ``tmp`` on any error."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(
            415,
            "upload a file as multipart/form-data with fields `file` and `purpose`",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    parts = _Parts(tmp, max_bytes, max_lines)
    parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        parts.close()
        tmp.unlink(missing_ok=True)
        raise APIError(
            400, f"malformed multipart body: {e}", code=ErrorCode.INVALID_INPUT
        ) from None
    except BaseException:
        parts.close()
        tmp.unlink(missing_ok=True)
        raise
    parts.close()
    if parts.upload.path is None:
        raise APIError(
            400, "the form has no `file` part", code=ErrorCode.INVALID_INPUT, param="file"
        )
    return parts.upload
