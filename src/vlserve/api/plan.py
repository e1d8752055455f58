"""One planning pass over a chat request: what the engine takes (``ChatPrompt``,
``SamplingParams``) and what the response side needs (``ResponsePlan``), its checks in the order
a client sees them (unsupported values and tools, then the engine's readiness, then sampling,
messages and media)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from vlserve.api.chat import attach_media, split_messages
from vlserve.api.convert import SamplingDefaults, check_supported, to_sampling
from vlserve.api.multimodal import load_parts
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.api.serving import Completion
from vlserve.api.tools import plan as plan_tools
from vlserve.engine import fields
from vlserve.engine.prompt import ChatPrompt
from vlserve.engine.request import SamplingParams, TokenEvent
from vlserve.errors import VLServeError
from vlserve.media import MediaLoader


@dataclass(frozen=True)
class ResponsePlan:
    """What answering a request needs from its body: the model name it asked for, whether it
    streams (and wants a usage chunk), reports logprobs, parses tool calls, which media kinds it
    brought (their tokens are reported), and the request's own name for the output-token limit
    (``max_tokens`` or ``max_completion_tokens``) to name the engine's errors by."""

    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    parse_tools: bool = False
    media: frozenset[str] = frozenset()  # "image", "video"
    output_tokens_param: str = "max_tokens"

    def completion(self, id: str, track: Callable[[TokenEvent], None]) -> Completion:
        """The serving side's view of this plan for the response ``id``."""
        return Completion(
            id,
            self.model,
            track,
            parse_tools=self.parse_tools,
            logprobs=self.logprobs,
            media=self.media,
        )

    def rename(self, exc: VLServeError) -> VLServeError:
        """``exc`` with ``param`` in this request's words: the only place where the engine's
        neutral fields (engine/fields.py) become request fields (``output_tokens`` → the limit
        field the client sent, ``prompt`` → ``messages``). Other errors are left as they are."""
        field = fields.field_of(exc)
        if field == fields.OUTPUT_TOKENS:
            exc.param = self.output_tokens_param
        elif field == fields.PROMPT:
            exc.param = "messages"
        return exc


class RequestPlan(NamedTuple):
    """``plan_request``'s answer; unpacks as ``prompt, params, response``."""

    prompt: ChatPrompt
    params: SamplingParams
    response: ResponsePlan


def tenant_salt(cache_salt: str | None, api_key: int | None) -> str | None:
    """The prefix cache's salt: the request's ``cache_salt``, and with the index of the client's
    API key (given when several keys must not share), the key too, so one key holder cannot learn
    another's prompts from ``cached_tokens`` (requests under one key still share, and within it
    ``cache_salt`` splits further)."""
    if api_key is None:
        return cache_salt
    return f"key{api_key}:{cache_salt or ''}"


async def plan_request(
    body: ChatCompletionRequest,
    *,
    max_n: int,
    ready: Callable[[], tuple[SamplingDefaults, int]],
    media: MediaLoader,
    api_key: int | None = None,
) -> RequestPlan:
    """Check ``body`` and turn it into the engine's inputs and the response's plan; raises the
    request's 4xx (naming the field at fault), or ``ready``'s 503.

    ``ready`` returns the sampling defaults and the vocabulary size once the engine is ready (it
    raises ``EngineUnavailableError`` before); it is called after the checks that need neither,
    so a malformed request is told so while the model loads. ``api_key``: see ``tenant_salt``.
    """
    check_supported(body, max_n)
    tools = plan_tools(body)
    defaults, vocab_size = ready()
    params = to_sampling(body, defaults, vocab_size=vocab_size, guide=tools.guide)
    template, refs = split_messages(body.messages)
    kwargs = body.mm_processor_kwargs.model_dump() if body.mm_processor_kwargs else None
    parts = await load_parts(media, refs, kwargs)
    prompt = ChatPrompt(
        attach_media(template, parts),
        cache_salt=tenant_salt(body.cache_salt, api_key),
        tools=tools.template_tools,
    )
    response = ResponsePlan(
        model=body.model,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        logprobs=bool(body.logprobs),
        parse_tools=tools.parse_calls,
        media=frozenset(ref.kind for ref in refs),
        output_tokens_param=(
            "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        ),
    )
    return RequestPlan(prompt, params, response)
