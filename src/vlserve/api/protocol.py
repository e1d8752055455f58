"""Pydantic models with OpenAI's exact field names: requests, responses, stream chunks, errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

# An unknown field is a 400 that names it; so are NaN and infinities (Python's json accepts them)
# and values of another JSON type (no false → 0.0, no "10" → 10): what the schema says is what
# is accepted.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

# Bounds on everything a client sizes. The body cap (--max-request-body-bytes) bounds the whole;
# these keep any one field from costing more than its purpose needs.
MAX_MESSAGES = 1024
MAX_PARTS_PER_MESSAGE = 256
MAX_TEXT_CHARS = 1_000_000  # per text; the context check bounds the tokens
# All texts of a request together. Tokenizing runs on one shared preprocessing thread at about
# 1 s per million characters: without this a 64 MiB body of text would hold it for a minute or
# more. 4 M characters is several times what fills a 256 K-token context.
MAX_TOTAL_TEXT_CHARS = 4_000_000
MAX_NAME_CHARS = 256  # model, message name, user
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOKENS = 2**31 - 1  # larger than any context: the context check gives the precise limit
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as OpenAI's clients send
MAX_LIST_FIELD = 128  # tools, logit_bias, metadata: refused or ignored, still bounded


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    # Required: a null content only comes with tool calls, which are not supported.
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=MAX_PARTS_PER_MESSAGE)]
    )
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(BaseModel):
    model_config = _STRICT

    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    # Below 0.01 the division of positive logits overflows to inf: no distribution is left.
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
            Field(max_length=MAX_STOP_STRINGS),
        ]
        | None
    ) = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False
    # vLLM's extension: requests with different salts never share prefix-cache blocks
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    n: int = Field(default=1, ge=1, le=128)
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only with values that change nothing; anything else is a 400 naming the field.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LIST_FIELD)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(default=None, max_length=MAX_LIST_FIELD)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("messages")
    @classmethod
    def _total_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(
            len(m.content)
            if isinstance(m.content, str)
            else sum(len(p.text) for p in m.content if isinstance(p, TextPart))
            for m in messages
        )
        if total > MAX_TOTAL_TEXT_CHARS:
            raise ValueError(
                f"the messages hold {total} characters of text; at most {MAX_TOTAL_TEXT_CHARS}"
            )
        return messages

    service_tier: str | None = Field(default=None, max_length=MAX_NAME_CHARS)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    """As OpenAI sends it: only the keys a chunk carries (role first, then content, then {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Health(BaseModel):
    status: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    running: int | None = None
    waiting: int | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
