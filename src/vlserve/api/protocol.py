"""Pydantic models with OpenAI's exact field names: requests, responses, stream chunks, errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from vlserve.api.content import (  # noqa: F401 (part of this module's API)
    MAX_TEXT_CHARS,
    ContentPart,
    ImagePart,
    ImageURL,
    MMProcessorKwargs,
    TextPart,
    VideoPart,
    VideoURL,
)
from vlserve.api.content import STRICT as _STRICT

# Bounds on everything a client sizes. The body cap (--max-request-body-bytes) bounds the whole;
# these keep any one field from costing more than its purpose needs.
MAX_MESSAGES = 1024
MAX_PARTS_PER_MESSAGE = 256
# All content parts of a request together, counted before validation: 1024 messages of 256
# one-character parts (an 8 MB body) held the event loop 2.5 s in validation and the
# preprocessing thread 13 s in the chat template.
MAX_TOTAL_PARTS = 4096
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
MAX_LIST_FIELD = 128  # tools, tool calls: bounded
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias entries


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    arguments: str = Field(max_length=MAX_TEXT_CHARS)  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message with tool_calls (checked in api.chat)
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=MAX_PARTS_PER_MESSAGE)]
        | None
    ) = None
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_LIST_FIELD)
    tool_call_id: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # What an earlier reply carries when a client sends it back as history
    # (`reply.choices[0].message.model_dump()`): accepted, bounded and ignored, as OpenAI does.
    refusal: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    audio: dict[str, Any] | None = Field(default=None, max_length=4)
    function_call: FunctionCall | None = None
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_LIST_FIELD)


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON schema of an object (checked in convert)
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # "schema" is a BaseModel attribute; the JSON field keeps OpenAI's name
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


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
    n: int = Field(default=1, ge=1, le=128)  # the server's --max-n is checked in convert
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_LIST_FIELD)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    # token id (a decimal string, as OpenAI's) -> bias in [-100, 100]; checked in convert
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    # OpenAI's hints that change no answer: accepted and ignored (nothing is stored; the prefix
    # cache needs no key; abuse tracking is the operator's)
    store: bool | None = None
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
    metadata: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None
    ) = Field(default=None, max_length=16)
    service_tier: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    safety_identifier: str | None = Field(default=None, max_length=MAX_NAME_CHARS)

    @field_validator("messages", mode="before")
    @classmethod
    def _total_parts(cls, messages: Any) -> Any:
        if isinstance(messages, list):
            parts = sum(
                len(m["content"])
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list)
            )
            if parts > MAX_TOTAL_PARTS:
                raise ValueError(
                    f"the messages hold {parts} content parts; at most {MAX_TOTAL_PARTS} per "
                    "request"
                )
        return messages

    @field_validator("messages")
    @classmethod
    def _total_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(
            len(m.content)
            if isinstance(m.content, str)
            else sum(len(p.text) for p in m.content or () if isinstance(p, TextPart))
            for m in messages
        )
        if total > MAX_TOTAL_TEXT_CHARS:
            raise ValueError(
                f"the messages hold {total} characters of text; at most {MAX_TOTAL_TEXT_CHARS}"
            )
        return messages


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
    image_tokens: int | None = None  # images' tokens (OpenAI's field), only with images
    video_tokens: int | None = None  # video frames' tokens, only when the request had videos

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler, self, ("cached_tokens",))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def _omit_none(
    handler: SerializerFunctionWrapHandler, model: BaseModel, keep: tuple[str, ...]
) -> dict[str, Any]:
    return {k: v for k, v in handler(model).items() if v is not None or k in keep}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    """``tool_calls`` only when there are some, as OpenAI sends it."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler, self, ("content",))


FinishReasonName = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler, self, ())


class DeltaToolCall(BaseModel):
    """The first delta of a call carries index, id, type and the name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler, self, ())


class Delta(BaseModel):
    """As OpenAI sends it: only the keys a chunk carries (role first, then content, then {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler, self, ())


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None = None


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
