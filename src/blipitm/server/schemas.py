"""Request and response bodies, as the OpenAI / vLLM / Cohere / Jina clients send and parse them.

These models define the committed OpenAPI document. Requests are validated by them; item-level
rules that need a precise ``param`` (token arrays, image references, modality pairing) are checked
in :mod:`blipitm.server.inputs` instead, where the item's position is known.

Every list a request may hold is an :data:`Items` list: its length is checked against
``--max-items`` *before* pydantic validates a single item, so a megabyte of ``[{}, {}, ...]`` costs
one length check, not a million validation errors (``tests/test_server_unit.py`` checks that no
request schema holds any other list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from blipitm.server.quantize import EmbeddingDtype

# -- bounded lists --------------------------------------------------------------------------------

# The --max-items of the app validating the current request (the guard middleware sets it; one
# process may run several apps in tests). Outside any request: a bound no real request reaches.
_ITEM_LIMIT: ContextVar[int] = ContextVar("blipitm_item_limit", default=1 << 20)
TOO_MANY_ITEMS = "too_many_items"  # the pydantic error type: answered 413, as inputs.check_count


@contextlib.contextmanager
def item_limit(limit: int) -> Iterator[None]:
    """Validate request bodies in this block against ``limit`` items per list."""
    token = _ITEM_LIMIT.set(limit)
    try:
        yield
    finally:
        _ITEM_LIMIT.reset(token)


def _bounded(value: Any) -> Any:
    # A "before" validator: it sees the parsed JSON list, so the items are not yet validated.
    limit = _ITEM_LIMIT.get()
    if isinstance(value, list) and len(value) > limit:
        raise PydanticCustomError(
            TOO_MANY_ITEMS,
            "{count} items in one request; the limit is {limit} (split the request)",
            {"count": len(value), "limit": limit},
        )
    return value


T = TypeVar("T")
Items = Annotated[list[T], BeforeValidator(_bounded)]
"""A request list: at most ``--max-items`` long, checked before its items are validated."""

# -- content parts (OpenAI chat style) ------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... URI, base64 bytes, or an http(s) URL")
    detail: str | None = Field(default=None, description="accepted for compatibility; ignored")


class ImageURLPart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImageURLPart | TextPart, Field(discriminator="type")]


class Content(BaseModel):
    """vLLM's multimodal form: ``{"content": [parts]}``, one item per part."""

    content: Items[ContentPart]


# -- errors ---------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- /v1/models -----------------------------------------------------------------------------------


class Override(BaseModel):
    field: str
    loaded: Any
    used: Any
    reason: str


class Price(BaseModel):
    text: int = Field(description="credits a metered key pays per text")
    image: int = Field(description="credits a metered key pays per image")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["itm", "caption"] | None = Field(
        description="image-text matching, or a captioner (/v1/chat/completions); null until a "
        "model the models file gives no kind has loaded"
    )
    default: bool = Field(description="answers requests that name no model")
    aliases: list[str] = Field(description="other names that resolve to this model")
    status: Literal["unloaded", "loading", "ready", "failed"] = Field(
        description="loaded or not; an unloaded model loads on its first request"
    )
    error: str | None = Field(None, description="why the model failed to load, if it did")
    price: Price
    protocol: str = Field(description="blip or transformers")
    source: str
    device: str
    dtype: str
    # Known once the model has loaded:
    embedding_dim: int | None
    image_size: int | None
    revision: str | None
    commit: str | None
    overrides: list[Override] | None = Field(description="config values the protocol changed")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- /v1/embeddings -------------------------------------------------------------------------------

# A token-id array is refused with a 400 naming it (inputs.classify), so its items are not
# validated here: a list of lists validated item by item would multiply the errors a bomb makes.
TokenIds = Annotated[
    list[Any],
    BeforeValidator(_bounded),
    WithJsonSchema({"type": "array", "items": {"type": "integer"}}),
]
EmbeddingItem = str | ContentPart | int | TokenIds


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"input": ["a dog"], "model": "blip"}})

    input: str | Items[EmbeddingItem] = Field(
        description="a text, a list of texts, or image references / image_url content parts. "
        "Token-id arrays are not supported."
    )
    model: str | None = Field(default=None, description="the served model name (optional)")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes"
    )
    dimensions: int | None = Field(default=None, description="must equal the embedding size")
    user: str | None = None
    modality: Literal["text", "image"] = Field(
        default="text", description="image: every string in `input` is an image reference"
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- multimodal inputs: {"content": [one part]} ----------------------------------------------------


def _parts_schema(*parts: dict[str, Any]) -> Any:
    """An input's ``content``: validated part by part in the route (``inputs.one_part``), where
    the input's position is known, so that a list of inputs never validates a list per input."""
    return WithJsonSchema(
        {"type": "array", "items": {"oneOf": list(parts)}, "minItems": 1, "maxItems": 1}
    )


def _part(kind: str, field: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"type": {"type": "string", "const": kind}, field: value},
        "required": ["type", field],
    }


_STRING = {"type": "string"}
_URL_OBJECT = {"type": "object", "properties": {"url": _STRING}, "required": ["url"]}


class EmbedImagePart(BaseModel):
    """Cohere v2's image part: ``image_url`` is ``{"url": ...}`` (what its SDK sends) or the
    reference itself."""

    type: Literal["image_url"]
    image_url: ImageURL | str


EmbedPart = Annotated[EmbedImagePart | TextPart, Field(discriminator="type")]


class EmbedInput(BaseModel):
    """Cohere v2's ``{"content": [part]}``: one text or one image part."""

    content: Annotated[
        list[Any],
        BeforeValidator(_bounded),
        _parts_schema(
            _part("text", "text", _STRING),
            _part("image_url", "image_url", {"anyOf": [_URL_OBJECT, _STRING]}),
        ),
    ] = Field(description="one part: this model has no fused text+image embedding")


class VoyageTextPart(BaseModel):
    type: Literal["text"]
    text: str


class VoyageImageURLPart(BaseModel):
    type: Literal["image_url"]
    image_url: str = Field(description="an http(s) URL (when the server fetches URLs)")


class VoyageImageBase64Part(BaseModel):
    type: Literal["image_base64"]
    image_base64: str = Field(description="a data:image/...;base64,... URI")


class VoyageVideoPart(BaseModel):
    """Voyage's video parts: parsed so that they are refused by name (this model has no video)."""

    type: Literal["video_url", "video_base64"]


VoyagePart = Annotated[
    VoyageTextPart | VoyageImageURLPart | VoyageImageBase64Part | VoyageVideoPart,
    Field(discriminator="type"),
]


class MultimodalInput(BaseModel):
    """Voyage's ``{"content": [part]}``: one text or one image part."""

    content: Annotated[
        list[Any],
        BeforeValidator(_bounded),
        _parts_schema(
            _part("text", "text", _STRING),
            _part("image_url", "image_url", _STRING),
            _part("image_base64", "image_base64", _STRING),
        ),
    ] = Field(description="one part: this model has no fused text+image embedding")


# -- /v2/embed ------------------------------------------------------------------------------------

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EmbedInputType = Literal["search_document", "search_query", "classification", "clustering", "image"]


class EmbedRequest(BaseModel):
    """Cohere's Embed v2 request."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "texts": ["a dog"],
                "input_type": "search_document",
                "embedding_types": ["float", "int8"],
            }
        }
    )

    model: str | None = Field(default=None, description="the served model name (optional)")
    input_type: EmbedInputType = Field(
        description="required, as in Cohere v2; accepted and checked, the vectors are the same"
    )
    texts: Items[str] | None = Field(default=None, description="texts, each embedded as a caption")
    images: Items[str] | None = Field(
        default=None,
        description="image data URIs (or http(s) URLs when the server fetches URLs)",
    )
    inputs: Items[EmbedInput] | None = Field(
        default=None, description="each {content: [one text or image_url part]}"
    )
    embedding_types: Items[EmbeddingType] | None = Field(
        default=None,
        description="default [float]; int8/uint8/binary/ubinary as docs/server.md defines them; "
        "base64: little-endian float32 bytes",
    )
    truncate: Literal["NONE", "START", "END"] | None = Field(
        default=None,
        description="END (default) and NONE: the protocol's own text length rule; START: 400",
    )
    max_tokens: int | None = Field(
        default=None, description="at least the tokens the model reads of a text, or omitted"
    )
    output_dimension: int | None = Field(default=None, description="the embedding size or omitted")
    priority: int | None = Field(default=None, description="accepted and ignored")


class EmbedByType(BaseModel):
    """The embeddings asked for, one list per type, in input order."""

    model_config = ConfigDict(populate_by_name=True)

    float_: list[list[float]] | None = Field(default=None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    input_tokens: int = Field(description="text tokens plus vision tokens: what is metered")
    text_tokens: int
    image_tokens: int = Field(description="vision tokens (patches + CLS) of the images")
    images: int


class EmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class EmbedResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    embeddings: EmbedByType
    texts: list[str] | None = Field(default=None, description="the texts, for a texts request")
    meta: EmbedMeta


# -- /v1/multimodalembeddings ---------------------------------------------------------------------


class MultimodalEmbeddingRequest(BaseModel):
    """Voyage's multimodal embeddings request."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"inputs": [{"content": [{"type": "text", "text": "a dog"}]}]}
        }
    )

    inputs: Items[MultimodalInput] = Field(description="each {content: [one part]}")
    model: str | None = Field(default=None, description="the served model name (optional)")
    input_type: Literal["query", "document"] | None = Field(
        default=None, description="accepted and checked; the vectors are the same"
    )
    truncation: bool = Field(
        default=True, description="accepted; the protocol's own text length rule applies"
    )
    output_encoding: Literal["base64"] | None = Field(
        default=None, description="base64: each embedding's bytes (little-endian float32)"
    )
    encoding_format: Literal["base64"] | None = Field(
        default=None, description="what Voyage's SDK sends for output_encoding"
    )
    output_dtype: EmbeddingDtype | None = Field(
        default=None, description="default float; the integer types as docs/server.md defines"
    )
    output_dimension: int | None = Field(default=None, description="the embedding size or omitted")


class MultimodalEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[int] | str
    index: int


class MultimodalUsage(BaseModel):
    text_tokens: int
    image_pixels: int = Field(description="pixels the model read: image_size² per image")
    video_pixels: int = 0
    total_tokens: int = Field(description="text tokens plus vision tokens: what is metered")


class MultimodalEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[MultimodalEmbedding]
    model: str
    usage: MultimodalUsage


# -- /v1/score ------------------------------------------------------------------------------------

ScoreSide = str | Items[str | ContentPart] | Content


class ScoreRequest(BaseModel):
    model: str | None = None
    text_1: ScoreSide = Field(description="one item (paired with every text_2 item) or N items")
    text_2: ScoreSide
    user: str | None = None


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float = Field(description="ITM match probability")
    itm_probability: float
    itm_logits: list[float] = Field(description="[no match, match]")
    itc_cosine: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


# -- /v1/rerank, /v2/rerank -----------------------------------------------------------------------


class TextDocument(BaseModel):
    text: str


class ImageDocument(BaseModel):
    """Jina's multimodal rerank item: ``{"image": URL or base64}``."""

    image: str = Field(description="data:image/...;base64,... URI, base64 bytes, or an http(s) URL")


class FieldsDocument(BaseModel):
    """A Cohere v1 document object: string fields, ranked by its ``text`` or ``rank_fields``."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str]

    text: str | None = None


class RerankRequest(BaseModel):
    model: str | None = None
    query: str | TextDocument | ImageDocument | ContentPart = Field(
        description="a text (ranks images) or an image (ranks texts): a string (a data:image URI "
        'string is an image), Jina\'s {"text": ...} / {"image": ...}, or a content part'
    )
    documents: Items[str | ImageDocument | ContentPart | FieldsDocument] | Content
    top_n: int | None = Field(default=None, description="return the best N (default: all)")
    rank_fields: Items[str] | None = Field(
        default=None,
        description="Cohere v1: the fields of document objects whose values, in this order, are "
        "the text ranked (default: text)",
    )
    return_documents: bool | None = Field(
        default=None,
        description="include each result's document ({text: the document as sent}). Default: "
        "/v1/rerank returns text documents (Jina's default), /v2/rerank none (Cohere v2's); image "
        "documents only when this is true",
    )
    max_chunks_per_doc: int | None = Field(
        default=None, description="Cohere v1; accepted and ignored (a caption is one chunk)"
    )
    max_tokens_per_doc: int | None = Field(
        default=None, description="Cohere v2; accepted and ignored (the model truncates texts)"
    )
    rerank_k: int | None = Field(
        default=None,
        description="score only the rerank_k documents with the highest ITC cosine with ITM "
        "(BLIP's two-stage retrieval); default: all",
    )
    user: str | None = None


class RerankDocument(BaseModel):
    """A returned document, in the shape Cohere's and litellm's clients parse: ``text`` is the
    text, or the image reference (data URI, base64 or URL) as sent; a document object's other
    fields come back too."""

    model_config = ConfigDict(extra="allow")

    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="ITM match probability")
    itc_cosine: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# -- operational ----------------------------------------------------------------------------------


class Status(BaseModel):
    status: str


class SearchRequest(BaseModel):
    model: str | None = None
    query: str | ContentPart = Field(
        description="a text (finds images in the index) or an image (finds captions); a "
        "data:image URI string is an image"
    )
    top_k: int = Field(default=10, description="results returned, best first")
    rerank_k: int = Field(
        default=128,
        description="candidates (by ITC cosine) scored with ITM; 0: ITC only",
    )
    user: str | None = None


class SearchResult(BaseModel):
    object: str = "search_result"
    id: int = Field(description="the item's id in the index")
    kind: str = Field(description="image or text")
    path: str | None = Field(
        default=None,
        description="image items: the indexed folder's name and the path inside it, or the path "
        "a JSONL file gave, relative to that file's folder; never an absolute path of the server",
    )
    text: str | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="what the JSONL line held besides image/text"
    )
    score: float = Field(description="BLIP protocol: itm_logits[1] + itc_cosine; else ITM prob")
    itc_cosine: float
    itm_probability: float | None = None
    itm_logit: float | None = None


class SearchResponse(BaseModel):
    object: str = "list"
    model: str
    data: list[SearchResult]
    usage: RerankUsage


class RateWindow(BaseModel):
    limit: int
    remaining: int
    reset_s: float = Field(description="seconds until the limit is whole again")


class KeyLimits(BaseModel):
    requests_per_minute: int | None
    items_per_minute: int | None
    concurrency: int | None
    credits: int | None = Field(description="credits granted in all (None: unlimited)")
    image_credits: int = Field(description="credits one image costs (a text costs 1)")
    window_s: float = Field(description="the window of the per-minute limits, in seconds")


class KeyRemaining(BaseModel):
    requests: RateWindow | None
    items: RateWindow | None
    concurrency: int | None
    credits: int | None


class UsageEntry(BaseModel):
    object: Literal["usage"] = "usage"
    name: str
    day: str = Field(description="UTC day, YYYY-MM-DD")
    endpoint: str
    model: str = Field(description="the served model's name ('': the request reached no model)")
    status: int
    requests: int
    texts: int
    images: int
    tokens: int
    credits: int
    latency_ms: float = Field(description="summed over the requests")


class KeyUsage(BaseModel):
    object: Literal["key_usage"] = "key_usage"
    name: str
    created: str
    expires: str | None
    models: list[str] | None
    limits: KeyLimits
    remaining: KeyRemaining
    prices: dict[str, Price] = Field(description="credits per text and image, by model")
    data: list[UsageEntry]


# -- /v1/chat/completions (a captioner) ----------------------------------------------------------


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Parts are validated in the route, for the last user message only (the one read), so that
    # a list of messages never validates a list per message.
    content: (
        str
        | Annotated[
            list[Any],
            BeforeValidator(_bounded),
            WithJsonSchema(
                {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            _part("text", "text", _STRING),
                            _part("image_url", "image_url", _URL_OBJECT),
                        ]
                    },
                }
            ),
        ]
        | None
    ) = Field(
        None,
        description="the last user message holds one image_url part and, optionally, one text "
        "part: the prompt the caption continues (default 'a picture of ')",
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, answered by a captioner: the caption of the image in
    the last user message. Beam search unless ``temperature`` > 0 (or only ``top_p``) is given,
    which samples (docs/captioner.md#server)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "blip-caption",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
                        ],
                    }
                ],
            }
        }
    )

    model: str | None = None
    messages: Items[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="tokens after the prompt (default 20)")
    max_completion_tokens: int | None = Field(None, ge=1, description="as max_tokens")
    min_tokens: int | None = Field(None, ge=0, description="tokens before the caption may end")
    n: int = Field(1, ge=1, le=64, description="captions: the best beams, or that many samples")
    temperature: float | None = Field(None, ge=0, description="> 0: sample at this temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (default 0.9)")
    top_k: int | None = Field(None, ge=0, description="sampling's top-k (default 50; 0: off)")
    num_beams: int | None = Field(None, ge=1, le=64, description="beam search's beams (default 3)")
    repetition_penalty: float | None = Field(None, gt=0, description="default 1.0, sampling 1.1")
    seed: int | None = Field(None, ge=0, description="reproducible samples")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Items[str] | None = Field(None, description="not supported: leave unset")
    logprobs: bool | None = Field(None, description="not supported: leave unset or false")
    presence_penalty: float | None = Field(
        None, description="not supported: use repetition_penalty"
    )
    frequency_penalty: float | None = Field(
        None, description="not supported: use repetition_penalty"
    )


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(description="the prompt's tokens and the image's vision tokens")
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: None = None


# -- /v1/explain ----------------------------------------------------------------------------------


class ExplainRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"image": "data:image/png;base64,...", "texts": ["a dog", "a cat"]}
        }
    )

    model: str | None = None
    image: str | ImageURLPart = Field(
        description="the image: a data:image/...;base64,... URI, base64 bytes, an http(s) URL "
        "(when the server fetches URLs), or an image_url content part"
    )
    texts: str | Items[str] = Field(description="one caption or several, each explained")
    layer: int | None = Field(
        default=None,
        description="text-encoder layer whose cross-attention is explained, 0-based; default 6 "
        "as LAVIS (or the second to last layer of a shallower model)",
    )
    token_maps: bool = Field(default=True, description="include each token's map")
    overlays: Literal["none", "caption", "tokens"] = Field(
        default="none",
        description="PNG data URIs of the maps drawn over the model's input image as LAVIS's "
        "getAttMap does: none, the caption's map, or the caption's and every token's",
    )
    user: str | None = None


class Tensor(BaseModel):
    """A float32 array: ``data`` is its little-endian bytes in row-major order, base64-encoded
    (as /v1/embeddings' base64 format)."""

    shape: list[int]
    dtype: Literal["float32"] = "float32"
    data: str


class ExplanationData(BaseModel):
    index: int
    object: Literal["explanation"] = "explanation"
    text: str
    tokens: list[str] = Field(description="the caption's word pieces as the model read them")
    itm_probability: float
    itm_logits: list[float] = Field(description="[no match, match]")
    itc_cosine: float
    map: Tensor = Field(description="[grid, grid]: the mean of the token maps")
    token_maps: Tensor | None = Field(default=None, description="[tokens, grid, grid]")
    overlay: str | None = Field(default=None, description="PNG data URI of `map` over the image")
    token_overlays: list[str] | None = Field(default=None, description="one PNG per token")


class ExplainResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    layer: int = Field(description="the layer explained")
    num_layers: int = Field(description="text-encoder layers: valid layers are 0..num_layers-1")
    grid: int = Field(description="patches per side of the image")
    data: list[ExplanationData]
    usage: RerankUsage
