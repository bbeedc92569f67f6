"""Image references in requests -> model-sized images, off the event loop and under the limits.

A reference is a ``data:image/...;base64,`` URI, bare base64, or (when enabled) an http(s) URL.
Decoding (and the pixel-limit check, which reads only the header) runs in a thread pool before the
request is queued for inference, so a corrupt or oversized image fails its own request only and
never reaches the inference worker.

This module turns a reference into bytes (with its own limits: the encoded size, the URL guard);
the engine's :meth:`~blipitm.engine.Engine.prepare_image` decodes them. Memory is bounded by
design, not by request size: each decode thread decodes one image, converts and resizes it to the
model's input and drops the full-size pixels before taking the next, so only model-sized arrays
are queued; and the engine's one decode budget (``--max-decoded-pixels``) caps the full-size
pixels held at once across all requests (excess decodes wait their turn).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from blipitm.errors import InvalidInputError, Loc, format_loc
from blipitm.processing import ResizedImage
from blipitm.server.errors import APIError, from_invalid_input
from blipitm.server.metrics import Metrics
from blipitm.server.urlfetch import URLFetcher

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_B64_ALPHABET = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")

# Encoded image bytes -> the model's input, under the engine's limits (Engine.prepare_image).
Prepare = Callable[[bytes, Loc], ResizedImage]


def is_image_data_uri(value: str) -> bool:
    """The rule that tells an image from a text where both may arrive as plain strings."""
    return value[:11].lower() == "data:image/"


class ImageLoader:
    """Turns image references into the model's input with ``prepare`` (the engine's), enforcing
    the limits on references; the engine enforces those on pixels."""

    def __init__(
        self,
        *,
        prepare: Prepare,
        executor: Executor,
        fetcher: URLFetcher | None,
        max_bytes: int,
        metrics: Metrics,
    ) -> None:
        self._prepare = prepare
        self._executor = executor
        self._fetcher = fetcher
        self.max_bytes = max_bytes
        self._metrics = metrics

    async def load_all(self, sources: Sequence[str], locs: Sequence[Loc]) -> list[ResizedImage]:
        """Decode every reference concurrently; the first failure fails the whole request."""
        tasks = [
            asyncio.ensure_future(self.load(s, loc)) for s, loc in zip(sources, locs, strict=True)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def load(self, source: str, loc: Loc) -> ResizedImage:
        data = await self._bytes(source, format_loc(loc))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._decode, data, loc)

    def _decode(self, data: bytes, loc: Loc) -> ResizedImage:
        try:
            return self._prepare(data, loc)
        except InvalidInputError as e:
            raise from_invalid_input(e) from None

    async def _bytes(self, source: str, param: str) -> bytes:
        match = _DATA_URI.match(source[:512])
        if match:
            return await self._from_data_uri(source, match, param)
        if _URL_SCHEME.match(source):
            return await self._from_url(source, param)
        if not source:
            raise APIError(400, "empty image reference", code="invalid_image", param=param)
        return await self._b64(source, param)

    async def _from_data_uri(self, source: str, match: re.Match[str], param: str) -> bytes:
        mime = match.group("mime").lower()
        if mime and not mime.startswith("image/"):
            raise APIError(
                415,
                f"data URI has media type {mime!r}; only image/* is accepted",
                code="unsupported_media_type",
                param=param,
            )
        if ";base64" not in match.group("params").lower():
            raise APIError(
                400,
                "only base64 data URIs are supported (data:image/...;base64,...)",
                code="invalid_image",
                param=param,
            )
        return await self._b64(source[match.end() :], param)

    async def _b64(self, payload: str, param: str) -> bytes:
        # Estimate first: refusing an oversized payload must not cost decoding it.
        if len(payload) * 3 // 4 > self.max_bytes + 3:
            raise APIError(
                413,
                f"the image is larger than the limit of {self.max_bytes} bytes",
                code="image_too_large",
                param=param,
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _b64decode, payload, param)

    async def _from_url(self, source: str, param: str) -> bytes:
        scheme = source.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            self._metrics.image_fetch_failures.labels(reason="scheme").inc()
            raise APIError(
                400,
                f"URL scheme {scheme!r} is not allowed; send images as data URIs or base64"
                + (" or http(s) URLs" if self._fetcher else ""),
                code="url_scheme_not_allowed",
                param=param,
            )
        if self._fetcher is None:
            self._metrics.image_fetch_failures.labels(reason="disabled").inc()
            raise APIError(
                400,
                "image URLs are disabled on this server (start it with --allow-url-fetch); "
                "send the image as a data URI or base64 instead",
                code="url_fetch_disabled",
                param=param,
            )
        try:
            return await self._fetcher.fetch(source, param=param)
        except APIError as e:
            self._metrics.image_fetch_failures.labels(reason=e.code).inc()
            raise


def _b64decode(payload: str, param: str) -> bytes:
    raw = payload.encode("ascii", "replace")
    raw = re.sub(rb"\s+", b"", raw)  # line-wrapped base64 (MIME style) is common
    if b"-" in raw or b"_" in raw:
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")  # the URL-safe alphabet
    raw += b"=" * (-len(raw) % 4)
    if not _B64_ALPHABET.match(raw):
        raise APIError(
            400,
            "not an image: expected a data:image/...;base64 URI, base64 image bytes"
            " or an http(s) URL",
            code="invalid_image",
            param=param,
        )
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid base64", code="invalid_image", param=param) from None
    if not data:
        raise APIError(400, "the image is empty (0 bytes)", code="invalid_image", param=param)
    return data
