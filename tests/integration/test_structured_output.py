"""Structured output, forced tool calls, logprobs and n through the openai SDK, on the tiny
random-weights model behind a real server: a weak model must still produce valid output."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import ServerProcess, png_data_url

pytestmark = pytest.mark.integration

INVOICE = {
    "type": "object",
    "properties": {
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "CNY"]},
        "vendor": {
            "type": "object",
            "properties": {"kind": {"enum": ["shop", "person"]}, "vat": {"type": "boolean"}},
            "required": ["kind", "vat"],
            "additionalProperties": False,
        },
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["qty"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["paid", "currency", "vendor", "lines"],
    "additionalProperties": False,
}
LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch a light",
        "parameters": {
            "type": "object",
            "properties": {
                "on": {"type": "boolean"},
                "room": {"enum": ["kitchen", "hall"]},
                "level": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["on", "room", "level"],
            "additionalProperties": False,
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "Read the invoice."}]


def _image_user() -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(96, 64)}},
                {"type": "text", "text": "Extract the fields."},
            ],
        }
    ]


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}}


def _stream_text(client: openai.OpenAI, **kw: Any) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_honoured(
    client: openai.OpenAI, server: ServerProcess, stream: bool, with_image: bool
) -> None:
    kw = {
        "model": server.model,
        "messages": _image_user() if with_image else USER,
        "response_format": _schema_format(INVOICE),
        "temperature": 0,
        "max_tokens": 300,
    }
    if stream:
        text, finish = _stream_text(client, **kw)
    else:
        out = client.chat.completions.create(**kw)
        text, finish = out.choices[0].message.content or "", out.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), INVOICE)
    assert " " not in text and "\n" not in text  # compact: no free whitespace


def test_sampled_schema_outputs_are_valid_and_seeded(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    kw = {
        "model": server.model,
        "messages": USER,
        "response_format": _schema_format(INVOICE),
        "temperature": 1.0,
        "seed": 3,
        "n": 2,
        "max_tokens": 300,
    }
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    for text in texts:
        jsonschema.validate(json.loads(text or ""), INVOICE)


def test_a_schema_cut_by_max_tokens_says_length(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    out = client.chat.completions.create(
        model=server.model,
        messages=USER,
        response_format=_schema_format(INVOICE),
        temperature=0,
        max_tokens=4,
    )
    assert out.choices[0].finish_reason == "length"
    assert (out.choices[0].message.content or "").startswith('{"paid":')


def test_json_object_starts_an_object(client: openai.OpenAI, server: ServerProcess) -> None:
    out = client.chat.completions.create(
        model=server.model,
        messages=USER,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=20,
    )
    text = out.choices[0].message.content or ""
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("choice", "parallel"),
    [
        ("required", False),
        ("required", None),
        ({"type": "function", "function": {"name": "set_light"}}, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_validate_against_their_parameters(
    client: openai.OpenAI, server: ServerProcess, choice: Any, parallel: bool | None, stream: bool
) -> None:
    kw: dict[str, Any] = {
        "model": server.model,
        "messages": _image_user(),
        "tools": [LIGHT, NOOP] if choice == "required" else [NOOP, LIGHT],
        "tool_choice": choice,
        "temperature": 0,
        "max_tokens": 400,
    }
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    calls, finish = _calls(client, stream, **kw)
    assert finish == "tool_calls"
    assert 1 <= len(calls) <= (1 if parallel is False or choice != "required" else 8)
    for name, arguments in calls:
        tool = LIGHT if name == "set_light" else NOOP
        assert name == "set_light" or choice == "required"
        jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])  # type: ignore[index]


def _calls(
    client: openai.OpenAI, stream: bool, **kw: Any
) -> tuple[list[tuple[str, str]], str | None]:
    if not stream:
        out = client.chat.completions.create(**kw)
        message = out.choices[0].message
        return [
            (c.function.name, c.function.arguments) for c in message.tool_calls or []
        ], out.choices[0].finish_reason  # type: ignore[union-attr]
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.type == "function"
                    calls[delta.index] = [delta.function.name, ""]  # type: ignore[union-attr, list-item]
                calls[delta.index][1] += delta.function.arguments or ""  # type: ignore[union-attr]
            finish = choice.finish_reason or finish
    return [(c[0], c[1]) for _, c in sorted(calls.items())], finish


def test_logprobs_agree_between_streaming_and_not(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    kw = {"model": server.model, "messages": USER, "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    entries = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(entries) == whole.usage.completion_tokens == 12  # type: ignore[union-attr]
    text = whole.choices[0].message.content or ""
    assert b"".join(bytes(e.bytes or []) for e in entries).decode("utf-8", "replace") == text
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy
        assert e.top_logprobs[0].logprob == e.logprob <= 0
    streamed = []
    for chunk in client.chat.completions.create(stream=True, logprobs=True, top_logprobs=3, **kw):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


def test_n_choices_share_one_prompt(client: openai.OpenAI, server: ServerProcess) -> None:
    kw = {"model": server.model, "messages": _image_user(), "max_tokens": 6, "n": 3}
    greedy = client.chat.completions.create(temperature=0, **kw)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 18  # type: ignore[union-attr]
    seeded = [client.chat.completions.create(temperature=1.0, seed=9, **kw) for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in seeded]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # each choice its own generator
    unseeded = client.chat.completions.create(temperature=1.0, **kw)
    assert len({c.message.content for c in unseeded.choices}) > 1
    indexes: dict[int, str] = {}
    finishes = set()
    for chunk in client.chat.completions.create(stream=True, temperature=0, **kw):
        for choice in chunk.choices:
            indexes[choice.index] = indexes.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes.add(choice.index)
    assert finishes == {0, 1, 2} and set(indexes.values()) == {greedy.choices[0].message.content}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": _schema_format(
                    {"type": "object", "properties": {"a": {"$ref": "#/no"}}}
                )
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"tools": [LIGHT], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [LIGHT, LIGHT]}, "tools"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 17}, "n"),
    ],
)
def test_bad_structured_requests_are_400s_naming_the_field(
    client: openai.OpenAI, server: ServerProcess, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=USER, max_tokens=2, extra_body=extra
        )
    assert info.value.body["param"] == param  # type: ignore[index]
    ok = client.chat.completions.create(model=server.model, messages=USER, max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def _image_tokens(
    client: openai.OpenAI, server: ServerProcess, detail: str | None, **kw: Any
) -> int:
    url: dict[str, Any] = {"url": png_data_url(1280, 720)}
    if detail is not None:
        url["detail"] = detail
    out = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": url}]}],
        max_tokens=1,
        **kw,
    )
    return out.usage.prompt_tokens  # type: ignore[union-attr]


def test_detail_and_processor_kwargs_change_the_image_tokens(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    full = _image_tokens(client, server, None)
    assert _image_tokens(client, server, "high") == _image_tokens(client, server, "auto") == full
    low = _image_tokens(client, server, "low")
    assert full - low == 880 - 252  # 1280x720: 880 image tokens; low: at most 256 (24x42/4)
    capped = _image_tokens(
        client, server, None, extra_body={"mm_processor_kwargs": {"max_pixels": 128 * 32 * 32}}
    )
    assert low > capped and full - capped > 880 - 128
    same = _image_tokens(
        client, server, None, extra_body={"mm_processor_kwargs": {"max_pixels": 10**12}}
    )
    assert same == full  # clamped to the server's --max-image-pixels
    tiny = _image_tokens(
        client, server, "low", extra_body={"mm_processor_kwargs": {"max_pixels": 4096}}
    )
    assert tiny < capped
    for bad in ({"min_pixels": 10, "max_pixels": 5}, {"max_pixels": 0}, {"fps": 0}, {"size": 2}):
        with pytest.raises(openai.BadRequestError) as info:
            _image_tokens(client, server, None, extra_body={"mm_processor_kwargs": bad})
        assert info.value.body["param"].startswith("mm_processor_kwargs")  # type: ignore[index]


def test_a_completed_schema_ends_the_request_even_with_ignore_eos(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    out = client.chat.completions.create(
        model=server.model,
        messages=USER,
        response_format=_schema_format(INVOICE),
        temperature=0,
        max_tokens=300,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content or ""), INVOICE)


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_hostile_schemas_are_400s_and_the_server_keeps_serving(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    import httpx

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model,
            messages=USER,
            max_tokens=2,
            response_format=_schema_format(_nested(40)),  # 80 levels of JSON
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model,
            messages=USER,
            max_tokens=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": _nested(40)}}],
        )
    assert info.value.body["param"] == "tools[0].function.parameters"  # type: ignore[index]
    # deeper than Python's JSON recursion: raw text, never parsed into a schema
    deep = '{"type":"object","properties":{"a":' * 3000 + "{}" + "}}" * 3000
    body = (
        '{"model":"' + server.model + '","messages":[{"role":"user","content":"x"}],'
        '"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":' + deep + "}}}"
    )
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    ok = client.chat.completions.create(model=server.model, messages=USER, max_tokens=1)
    assert ok.choices[0].finish_reason == "length"
