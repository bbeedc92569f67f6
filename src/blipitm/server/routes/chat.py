"""``/v1/chat/completions``: OpenAI's chat API, answered by a captioner of the family.

The last user message holds the image (one ``image_url`` part) and, optionally, a text part: the
prompt the caption continues (BLIP's ``"a picture of "`` when there is none; the caption is
returned without it, as BLIP's ``generate`` does). Earlier messages are not read: a captioner has
no conversation. Beam search unless the request asks to sample (``temperature`` > 0, or
``top_p`` alone); ``n`` captions are the best beams or ``n`` samples. ``stream`` sends each
finished caption as one chunk (the caption is written whole, then sent). docs/captioner.md#server
documents the mapping.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from blipitm.engine.jobs import Caption
from blipitm.engine.types import CaptionResult
from blipitm.errors import Loc, format_loc
from blipitm.server.context import RequestContext, ready
from blipitm.server.errors import API_ERRORS, APIError, ErrorCode, from_validation_errors
from blipitm.server.inputs import ImageItem, TextItem
from blipitm.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ImageURLPart,
    TextPart,
)

router = APIRouter()

CHAT_PARTS: dict[str, type[BaseModel]] = {"text": TextPart, "image_url": ImageURLPart}

Context = Annotated[
    RequestContext[ChatCompletionRequest], ready(ChatCompletionRequest, kind="caption")
]

# The captioner's argument an engine error names -> the request's field.
_FIELDS = {
    "max_length": "max_tokens",
    "min_length": "min_tokens",
    "num_captions": "n",
    "images": "messages",
}


def _bad(message: str, param: str, code: ErrorCode = ErrorCode.INVALID_INPUT) -> APIError:
    return APIError(400, message, code=code, param=param)


def _unsupported(body: ChatCompletionRequest) -> None:
    """Refuse what a captioner cannot do rather than ignore it."""
    if body.stop:
        raise _bad("stop sequences are not supported; leave `stop` unset", "stop")
    if body.logprobs:
        raise _bad("log probabilities are not returned; leave `logprobs` unset", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _bad(f"`{name}` is not supported; use `repetition_penalty`", name)


def _image_and_prompt(body: ChatCompletionRequest) -> tuple[ImageItem, TextItem | None]:
    """The last user message's image part and its text part (the prompt), if any."""
    last = max((i for i, m in enumerate(body.messages) if m.role == "user"), default=None)
    if last is None:
        raise _bad("needs a user message holding an image_url part", "messages")
    where: Loc = ("messages", last, "content")
    content = body.messages[last].content
    parts = _parts([] if content is None or isinstance(content, str) else content, where)
    images = [(i, p) for i, p in enumerate(parts) if isinstance(p, ImageURLPart)]
    texts = [(i, p) for i, p in enumerate(parts) if isinstance(p, TextPart)]
    param = format_loc(where)
    if len(images) != 1:
        raise _bad(
            f"the last user message must hold exactly one image_url part (it holds "
            f"{len(images)}): a captioner writes the caption of one image; send one request "
            "per image (or a Batch API job)",
            param,
            ErrorCode.UNSUPPORTED_INPUT if images else ErrorCode.INVALID_INPUT,
        )
    if len(texts) > 1:
        raise _bad("at most one text part: the prompt the caption continues", param)
    (i, image), prompt = images[0], None
    if texts:
        j, text = texts[0]
        prompt = TextItem(text.text, (*where, j, "text"))
    return ImageItem(image.image_url.url, (*where, i, "image_url", "url")), prompt


def _parts(content: list[Any], where: Loc) -> list[BaseModel]:
    """The message's parts, each validated as the model its ``type`` names."""
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        model = CHAT_PARTS.get(kind) if isinstance(kind, str) else None
        if model is None:
            msg = "a part is an object whose type is 'text' or 'image_url'"
            raise from_validation_errors([{"loc": (*where, i, "type"), "msg": msg, "type": "part"}])
        try:
            parts.append(model.model_validate(part))
        except ValidationError as e:
            errors = [{**err, "loc": (*where, i, *err["loc"])} for err in e.errors()]
            raise from_validation_errors(errors) from None
    return parts


def _settings(
    body: ChatCompletionRequest, prompt_tokens: int, prompt: str | None
) -> dict[str, Any]:
    """The request as :meth:`Captioner.caption`'s keywords. Lengths count the prompt's tokens
    there; here ``max_tokens`` and ``min_tokens`` count the caption's, as OpenAI's do."""
    sample = (body.temperature > 0) if body.temperature is not None else body.top_p is not None
    settings: dict[str, Any] = {"sample": sample, "num_captions": body.n}
    if prompt is not None:
        settings["prompt"] = prompt
    new_tokens = body.max_completion_tokens or body.max_tokens
    if new_tokens is not None:
        settings["max_length"] = prompt_tokens + new_tokens
    if body.min_tokens:
        settings["min_length"] = prompt_tokens + body.min_tokens
    if sample:
        if body.num_beams not in (None, 1):
            raise _bad(
                "sampling draws each caption on its own; leave `num_beams` unset", "num_beams"
            )
        for name in ("temperature", "top_p", "top_k", "seed"):
            value = getattr(body, name)
            if value is not None:
                settings[name] = value
    else:
        settings["num_beams"] = body.num_beams or max(3, body.n)  # BLIP's 3 beams, or n
    if body.repetition_penalty is not None:
        settings["repetition_penalty"] = body.repetition_penalty
    return settings


def _loc(loc: Loc) -> Loc:
    """A captioner error's location as the request's field (``max_length`` -> ``max_tokens``)."""
    if not loc or not isinstance(loc[0], str):
        return loc
    return (_FIELDS.get(loc[0], loc[0]), *loc[1:])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=API_ERRORS,
)
async def chat_completions(ctx: Context) -> Any:
    """OpenAI's chat completions, answered by a captioner: the caption of the image in the last
    user message (``n`` of them), continuing its text part if there is one."""
    body = ctx.body
    _unsupported(body)
    if body.stream and ctx.background:
        raise _bad("a Batch API line cannot stream; set `stream` to false", "stream")
    image_item, prompt_item = _image_and_prompt(body)
    texts, images = await ctx.inputs([prompt_item] if prompt_item else [], [image_item])
    prompt = texts[0] if texts else None
    prompt_tokens = len(
        ctx.captioner.prompt_ids(prompt) if prompt is not None else ctx.captioner.prompt_ids()
    )
    settings = _settings(body, prompt_tokens, prompt)
    (result,) = await ctx.run(Caption(images, settings), _loc)
    return _answer(ctx, result, prompt_tokens)


def _answer(
    ctx: RequestContext[ChatCompletionRequest], result: CaptionResult, prompt_tokens: int
) -> Any:
    image_tokens = ctx.captioner.info.image_tokens
    completion = sum(result.tokens)
    usage = {
        "prompt_tokens": prompt_tokens + image_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + image_tokens + completion,
    }
    ctx.account.bill(usage["total_tokens"])
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": ctx.model_name,
    }
    reasons = result.finish_reasons
    if not ctx.body.stream:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(zip(result.captions, reasons, strict=True))
        ]
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": choices,
                "usage": usage,
                "system_fingerprint": None,
            }
        )
    options = ctx.body.stream_options
    return StreamingResponse(
        _chunks(
            head, result.captions, reasons, usage if options and options.include_usage else None
        ),
        media_type="text/event-stream",
    )


def _chunks(
    head: dict[str, Any], captions: list[str], reasons: list[str], usage: dict[str, int] | None
) -> Iterator[str]:
    """OpenAI's server-sent events: per caption its text in one delta, then its finish reason;
    the usage (when asked for) in a last chunk with no choices; then ``[DONE]``."""

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **more}
        return f"data: {json.dumps(chunk)}\n\n"

    for i, (text, reason) in enumerate(zip(captions, reasons, strict=True)):
        delta = {"role": "assistant", "content": text}
        yield event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"
