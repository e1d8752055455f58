"""api/plan.py: one planning pass over a chat request; chat.split_messages over typed messages;
the engine's neutral error fields named back in the request's words."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from tests.unit.test_api_fake_engine import FakeEngine, _body, _with_app
from vlserve.api.chat import split_messages
from vlserve.api.convert import SamplingDefaults
from vlserve.api.plan import RequestPlan, ResponsePlan, plan_request
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.fields import OUTPUT_TOKENS, PROMPT, about, field_of
from vlserve.engine.scheduler import Scheduler, SchedulerConfig
from vlserve.errors import ContextLengthError, EngineUnavailableError, InvalidRequestError
from vlserve.media import MediaConfig, MediaLoader

MESSAGES = [
    {"role": "developer", "content": "rules"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "u1", "detail": "low"}},
            {"type": "video_url", "video_url": {"url": "v1"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
]


def _request(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **kw})


def test_typed_messages_split_as_their_dicts_did() -> None:
    typed = _request().messages
    assert split_messages(typed) == split_messages([m.model_dump(exclude_none=True) for m in typed])
    template, refs = split_messages(typed)
    assert [(r.kind, r.url, r.detail) for r in refs] == [
        ("image", "u1", "low"),
        ("video", "v1", None),
    ]
    assert template[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "user"}, "messages[0].content"),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_typed_messages_refused_as_their_dicts_were(message: dict, param: str) -> None:
    typed = ChatCompletionRequest.model_validate({"model": "m", "messages": [message]}).messages
    with pytest.raises(InvalidRequestError) as got:
        split_messages(typed)
    with pytest.raises(InvalidRequestError) as want:
        split_messages([m.model_dump(exclude_none=True) for m in typed])
    assert (got.value.message, got.value.param) == (want.value.message, want.value.param)
    assert got.value.param == param


def _png_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 128, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


async def _plan(body: ChatCompletionRequest, ready: object, **kw: object) -> RequestPlan:
    loader = MediaLoader(MediaConfig())
    try:
        return await plan_request(body, max_n=2, ready=ready, media=loader, **kw)  # type: ignore[arg-type]
    finally:
        await loader.aclose()


def _ready() -> tuple[SamplingDefaults, int]:
    return SamplingDefaults(top_k=5), 1000


def test_plan_request_gives_the_prompt_the_params_and_the_response_plan() -> None:
    image = {"type": "image_url", "image_url": {"url": _png_url()}}
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
            "max_completion_tokens": 5,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 3,
            "tools": TOOLS,
            "cache_salt": "s",
        }
    )
    prompt, params, response = asyncio.run(_plan(body, _ready, api_key=1))
    (message,) = prompt.messages
    assert message["content"][0] == {"type": "text", "text": "hi"}
    assert message["content"][1]["type"] == "image" and message["content"][1]["image"].size == (
        8,
        6,
    )
    assert prompt.cache_salt == "key1:s" and prompt.tools == TOOLS
    assert (params.max_tokens, params.n, params.logprobs, params.top_k) == (5, 2, 3, 5)
    assert response == ResponsePlan(
        model="m",
        stream=True,
        include_usage=True,
        logprobs=True,
        parse_tools=True,
        media=frozenset({"image"}),
        output_tokens_param="max_completion_tokens",
    )
    text_only = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_salt": "s"}
    prompt, _, plain = asyncio.run(_plan(ChatCompletionRequest.model_validate(text_only), _ready))
    assert prompt.cache_salt == "s" and prompt.tools is None
    assert plain == ResponsePlan(model="m")  # max_tokens by default, no stream, no media


def test_plan_request_refuses_before_asking_readiness_what_needs_none() -> None:
    def loading() -> tuple[SamplingDefaults, int]:
        raise EngineUnavailableError("the model is still loading; retry shortly")

    with pytest.raises(InvalidRequestError) as info:  # a 400 while the model loads
        asyncio.run(_plan(_request(n=3), loading))
    assert info.value.param == "n"
    with pytest.raises(EngineUnavailableError):  # the messages are checked once it is ready
        asyncio.run(_plan(_request(), loading))


@pytest.mark.parametrize("client_sent", ["max_tokens", "max_completion_tokens"])
def test_the_engines_output_token_field_is_named_as_the_client_named_it(client_sent: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], client_sent: 9}
    response = asyncio.run(_plan(ChatCompletionRequest.model_validate(body), _ready)).response
    exc = response.rename(about(OUTPUT_TOKENS, ContextLengthError("over the context")))
    assert exc.param == client_sent
    assert getattr(exc, "field", None) == OUTPUT_TOKENS


def test_rename_maps_only_the_engines_fields() -> None:
    response = ResponsePlan(model="m", output_tokens_param="max_completion_tokens")
    assert response.rename(about(PROMPT, ContextLengthError("long"))).param == "messages"
    # an engine that sets only OpenAI's usual name is read alike
    assert response.rename(ContextLengthError("x", param="max_tokens")).param == (
        "max_completion_tokens"
    )
    for param in ("tool_choice", "messages[0].tool_calls", None):
        assert response.rename(InvalidRequestError("x", param=param)).param == param


def test_the_schedulers_refusal_is_about_output_tokens() -> None:
    """The engine says ``output_tokens`` (not a request name); the API names it."""
    scheduler = Scheduler(SchedulerConfig(reserve_fraction=0.0), BlockManager(5, 16))
    with pytest.raises(ContextLengthError) as info:
        scheduler.check_admissible(10, 100)
    assert field_of(info.value) == OUTPUT_TOKENS
    response = ResponsePlan(model="m", output_tokens_param="max_completion_tokens")
    assert response.rename(info.value).param == "max_completion_tokens"


def test_an_output_tokens_refusal_reaches_the_client_under_its_limit_name() -> None:
    """Over HTTP the engine's ``output_tokens`` is the field the client sent."""
    for sent in ("max_tokens", "max_completion_tokens"):
        fake = FakeEngine()
        fake.refuse = about(OUTPUT_TOKENS, ContextLengthError("needs more KV than there is"))
        resp = asyncio.run(_with_app(fake, _body(**{sent: 5})))
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["param"] == sent
