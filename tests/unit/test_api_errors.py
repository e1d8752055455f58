"""The single exception → OpenAI error mapping."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from vlserve.api.errors import (
    _loc_to_param,
    body_for,
    from_http,
    response_for,
    send_error,
    validation_error,
)
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.errors import (
    AuthenticationError,
    ClientTimeoutError,
    EngineUnavailableError,
    MediaError,
    OverloadedError,
    VLServeError,
)


def test_body_shape() -> None:
    body = body_for(MediaError("image 1: broken", param="messages[0].content[1]"))
    assert body == {
        "error": {
            "message": "image 1: broken",
            "type": "invalid_request_error",
            "param": "messages[0].content[1]",
            "code": "invalid_image",
        }
    }


def test_retry_after_on_429_and_503() -> None:
    assert response_for(OverloadedError("busy", retry_after_s=3)).headers["retry-after"] == "3"
    r = response_for(EngineUnavailableError("loading"))
    assert r.status_code == 503 and "retry-after" in r.headers


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}
                ],
            },
            "messages[0].content[0].image_url.url",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "bogus": 1}, "bogus"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (  # an object of the wrong type deep inside names its place, not "invalid JSON"
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}
                ],
            },
            "messages[0].content[0].image_url",
        ),
    ],
)
def test_validation_errors_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    response = validation_error(RequestValidationError(errors))
    assert response.status_code == 400
    error = json.loads(response.body)["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and param in error["message"]


def test_loc_to_param_drops_union_tags() -> None:
    assert _loc_to_param(("body", "stop", "list[str]", 2)) == "stop[2]"
    assert _loc_to_param(("body", "messages", 0, "content", "list[x]", 1, "text", "text")) == (
        "messages[0].content[1].text"
    )


def test_broken_json_says_where_and_names_no_field() -> None:
    error = {"type": "json_invalid", "loc": ("body", 28), "msg": "JSON decode error", "input": {}}
    response = validation_error(
        RequestValidationError([{**error, "ctx": {"error": "Expecting value"}}])
    )
    body = json.loads(response.body)["error"]
    assert response.status_code == 400 and body["param"] is None
    assert body["message"] == "request body is not valid JSON: Expecting value at character 28"


def _sent(exc: VLServeError, close: bool = False) -> tuple[int, dict[bytes, bytes], dict]:
    """What ``send_error`` writes through ASGI for ``exc``."""
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    asyncio.run(send_error(send, exc, close=close))
    start, body = messages
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def test_middleware_refusals_are_sent_from_the_exception_tree() -> None:
    """The middleware's answers take status, type, code and headers from the error itself:
    there is no second status table to drift from the handlers' answers."""
    status, headers, body = _sent(AuthenticationError("invalid API key"), close=True)
    assert status == 401 and body == body_for(AuthenticationError("invalid API key"))
    assert headers[b"www-authenticate"] == b"Bearer" and headers[b"connection"] == b"close"
    busy = EngineUnavailableError("busy", retry_after_s=1, code="server_busy")
    status, headers, body = _sent(busy)
    assert (status, headers[b"retry-after"], body["error"]["type"]) == (
        503,
        b"1",
        "service_unavailable",
    )
    assert b"connection" not in headers and body["error"]["code"] == "server_busy"
    status, _, body = _sent(ClientTimeoutError("slow", code="header_timeout"))
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        408,
        "invalid_request_error",
        "header_timeout",
    )
    # the same error through FastAPI's handler path gives the same answer
    r = response_for(AuthenticationError("invalid API key"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("status", "code", "type_"),
    [
        (400, "invalid_json", "invalid_request_error"),
        (404, "not_found", "invalid_request_error"),
        (405, "method_not_allowed", "invalid_request_error"),
        (413, "payload_too_large", "invalid_request_error"),
        (431, "headers_too_large", "invalid_request_error"),
        (418, "http_418", "internal_error"),
    ],
)
def test_framework_http_errors_join_the_tree(status: int, code: str, type_: str) -> None:
    exc = from_http(status, "detail")
    assert (exc.status, exc.code, exc.type) == (status, code, type_)
    assert exc.message == "detail" or code == "invalid_json"
