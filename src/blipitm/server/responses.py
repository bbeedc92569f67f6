"""What the model routes' responses share: the ``usage`` object, built by one helper.

``prompt_tokens`` is what :meth:`RequestContext.usage_tokens` counts (the tokens the engine
read for the texts, from its results' ``text_tokens``, plus the vision tokens of each image)
and meters; nothing is generated, so ``total_tokens`` is the same number. vLLM's score response
also carries ``completion_tokens: 0``.
"""

from __future__ import annotations

from typing import Any

from blipitm.server.context import RequestContext


def usage(
    ctx: RequestContext[Any], text_tokens: int, images: int, *, completion_tokens: bool = False
) -> dict[str, int]:
    """The request's ``usage``: ``text_tokens`` the engine read, ``images`` it encoded."""
    tokens = ctx.usage_tokens(text_tokens, images)
    out = {"prompt_tokens": tokens, "total_tokens": tokens}
    if completion_tokens:
        out["completion_tokens"] = 0
    return out
