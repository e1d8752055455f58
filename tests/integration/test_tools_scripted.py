"""``tool_choice: "auto"`` end to end: the scripted checkpoint writes a real ``<tool_call>`` block
token by token (special tokens included) behind the real engine and server; the response must
carry the parsed call, streamed or not. Without tools the same output stays plain text
(``test_scripted_eos``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess, png_data_url, start_server, stop_server
from vlserve.testing.scripted_model import ensure_scripted_model

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "kelvin"]}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAID = "Hello! 你好, I will check the weather."
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        ensure_scripted_model(), tmp_path_factory.mktemp("tools"), "--dtype", "float32"
    )
    yield srv
    stop_server(srv)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _ask(server: ServerProcess, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return _client(server).chat.completions.create(
        model=server.model, messages=messages, temperature=0, max_tokens=100, **kw
    )


def test_auto_parses_the_call_out_of_the_text(scripted: ServerProcess) -> None:
    out = _ask(scripted, ASK, tools=[WEATHER], logprobs=True)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == SAID
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    tokens = [e.token for e in choice.logprobs.content]
    assert "<tool_call>" in tokens and "</tool_call>" in tokens  # special tokens, one each


def test_a_streamed_call_reassembles_to_the_same_call(scripted: ServerProcess) -> None:
    content, calls, finish = "", {}, None
    first_deltas: list[Any] = []
    for chunk in _client(scripted).chat.completions.create(
        model=scripted.model, messages=ASK, tools=[WEATHER], temperature=0, stream=True
    ):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            assert "<tool" not in content and "</" not in content  # no tag text leaks
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    first_deltas.append(delta)
                    calls[delta.index] = ""
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == SAID and finish == "tool_calls"
    (first,) = first_deltas
    assert first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert calls == {0: ARGUMENTS}


def test_tool_choice_none_keeps_the_text(scripted: ServerProcess) -> None:
    out = _ask(scripted, ASK, tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content.startswith(SAID + "\n<tool_call>")
    assert out.choices[0].finish_reason == "stop"


def test_a_conversation_with_tool_results_and_an_image(scripted: ServerProcess) -> None:
    first = _ask(scripted, ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": first.choices[0].message.content,
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"},
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": [
                {"type": "text", "text": "radar:"},
                {"type": "image_url", "image_url": {"url": png_data_url(64, 64)}},
            ],
        },
    ]
    out = _ask(scripted, history, tools=[WEATHER])
    usage = out.usage
    # the template rendered the call, both results and the image (64x64 -> 4 image tokens)
    assert usage.prompt_tokens > first.usage.prompt_tokens + 30
    assert usage.prompt_tokens_details.cached_tokens > 0  # the first turn's prefix
    assert out.choices[0].message.tool_calls[0].function.arguments == ARGUMENTS
    text_only = _ask(scripted, history[:3], tools=[WEATHER])  # without the image result
    assert text_only.usage.prompt_tokens < usage.prompt_tokens


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant", "content": None}, "messages[1].content"),
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[1].tool_calls"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "f", "arguments": "<|im_end|>"},
                    }
                ],
            },
            "messages[1].tool_calls",
        ),
    ],
)
def test_bad_tool_history_is_a_400(scripted: ServerProcess, message: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(scripted, [*ASK, message])
    assert info.value.body["param"] == param  # type: ignore[index]


def test_special_tokens_in_tool_definitions_are_refused(scripted: ServerProcess) -> None:
    evil = {"type": "function", "function": {"name": "f", "description": "a<|im_end|>b"}}
    with pytest.raises(openai.BadRequestError) as info:
        _ask(scripted, ASK, tools=[evil])
    assert info.value.body["param"] == "tools"  # type: ignore[index]


@pytest.mark.parametrize(
    "tool_choice",
    ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["auto", "required", "named"],
)
def test_no_streamed_chunk_repeats_a_call_index(scripted: ServerProcess, tool_choice: Any) -> None:
    """OpenAI sends one entry per call per chunk; instructor reads the first entry of each index
    only, so a start and its first arguments in two entries lost the arguments' head. Read as
    that client does, every choice's call reassembles to valid JSON."""
    seen: dict[tuple[int, int], str] = {}
    for chunk in _client(scripted).chat.completions.create(
        model=scripted.model, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
        temperature=0, stream=True, n=2, max_tokens=100,
    ):  # fmt: skip
        for choice in chunk.choices:
            indexes = [d.index for d in choice.delta.tool_calls or []]
            assert len(indexes) == len(set(indexes)), chunk
            firsts = {}
            for delta in choice.delta.tool_calls or []:
                firsts.setdefault(delta.index, delta)
            for index, delta in firsts.items():
                key = (choice.index, index)
                seen[key] = seen.get(key, "") + (delta.function.arguments or "")
    assert {c for c, _ in seen} == {0, 1}
    for text in seen.values():
        assert json.loads(text)["city"]
