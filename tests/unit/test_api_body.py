"""Bodies scanned within budgets before they are parsed (api/body.py), and the middleware's cap
on the body bytes all requests hold at once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vlserve.api.body import MAX_JSON_DEPTH, MAX_JSON_TOKENS, is_json, parse_model
from vlserve.api.metrics import Metrics
from vlserve.api.middleware import RequestContextMiddleware
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.errors import InvalidRequestError, PayloadTooLargeError

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _body(**extra: object) -> bytes:
    return json.dumps({**BASE, **extra}).encode()


def _errors(body: bytes) -> list[dict]:
    with pytest.raises(RequestValidationError) as info:
        parse_model(body, ChatCompletionRequest)
    return list(info.value.errors())


def test_a_valid_body_parses_to_the_model() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    request = parse_model(_body(max_tokens=3, response_format=schema), ChatCompletionRequest)
    assert isinstance(request, ChatCompletionRequest) and request.max_tokens == 3
    assert request.response_format.json_schema.json_schema == {"type": "object"}  # type: ignore[union-attr]


def test_an_unknown_top_level_field_is_refused_before_its_value_is_scanned() -> None:
    # the value alone is over the token budget: refused for the key, the value never counted
    hostile = b'{"model": "m", "zzz": [' + b"[]," * (MAX_JSON_TOKENS + 10) + b"[]]}"
    (error,) = _errors(hostile)
    assert error["type"] == "extra_forbidden" and error["loc"] == ("body", "zzz")


def test_keys_of_nested_objects_are_the_models_to_judge() -> None:
    errors = _errors(_body(stream_options={"zzz": 1}))
    assert errors[0]["type"] == "extra_forbidden"
    assert errors[0]["loc"] == ("body", "stream_options", "zzz")


def test_too_many_tokens_are_413_before_parsing() -> None:
    hostile = _body(stop=[1] * (MAX_JSON_TOKENS + 1))
    with pytest.raises(PayloadTooLargeError, match="JSON tokens"):
        parse_model(hostile, ChatCompletionRequest)


def test_nesting_past_the_depth_budget_is_invalid_json() -> None:
    deep = b'{"metadata": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
    with pytest.raises(InvalidRequestError) as info:
        parse_model(deep, ChatCompletionRequest)
    assert info.value.code == "invalid_json"


def test_broken_json_is_reported_as_fastapi_did() -> None:
    (error,) = _errors(b'{"model": "m", ')
    assert error["type"] == "json_invalid" and error["loc"][0] == "body"
    assert _errors(b'{"model": "\xff\xfe"}')[0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "text",
    ['a "quoted" [word]', "ends in a backslash \\", '\\"[{', "\\\\", 'x\\\\"y', "}{][,:"],
)
def test_brackets_and_escapes_inside_strings_are_text(text: str) -> None:
    body = json.dumps({**BASE, "messages": [{"role": "user", "content": text}], "user": text})
    request = parse_model(body.encode(), ChatCompletionRequest)
    assert request.messages[0].content == text and request.user == text


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=20,
    ),
    st.text(max_size=12),
)
def test_any_value_under_a_known_key_scans_clean(value: object, text: str) -> None:
    """The scan never refuses what the parser accepts: arbitrary JSON as a free-form field."""
    body = json.dumps(
        {**BASE, "messages": [{"role": "user", "content": text}], "metadata": {"k": text}},
        ensure_ascii=False,
    )[:-1] + ', "mm_processor_kwargs": null, "audio_x": 1}'
    (error,) = _errors(body.encode())  # the scan found the one unknown key past the strings
    assert error["loc"] == ("body", "audio_x")
    plain = json.dumps({**BASE, "stream_options": None, "logit_bias": None, "x": value})
    assert _errors(plain.encode())[0]["loc"] == ("body", "x")


def test_content_types_parsed_as_fastapi_does() -> None:
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8")
    assert is_json("application/merge-patch+json")
    assert not is_json(None) and not is_json("text/plain") and not is_json("")


# -- the cap on body bytes held at once ----------------------------------------------------------


def test_bodies_held_at_once_are_capped_with_503_and_released() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: Request) -> JSONResponse:
        body = await request.body()
        entered.set()
        await release.wait()
        return JSONResponse({"size": len(body)})

    app = RequestContextMiddleware(
        Starlette(routes=[Route("/v1/echo", slow, methods=["POST"])]),
        metrics=Metrics(),
        max_body_bytes=1000,
        max_headers=12,
        max_header_bytes=2048,
        body_routes=frozenset({("POST", "/v1/echo")}),
        max_inflight_body_bytes=1500,
    )

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.ensure_future(client.post("/v1/echo", content=b"a" * 1000))
            await entered.wait()
            refused = await client.post("/v1/echo", content=b"b" * 1000)
            release.set()
            held = await first
            after = await client.post("/v1/echo", content=b"c" * 1000)
        return held, refused, after

    held, refused, after = asyncio.run(scenario())
    assert held.status_code == 200 and after.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "server_busy" and "--max-inflight-body-mb" in error["message"]
    assert app.inflight_body_bytes == 0
