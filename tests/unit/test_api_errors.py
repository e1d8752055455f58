"""The single exception → OpenAI error mapping."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from vlserve.api.errors import _loc_to_param, body_for, response_for, validation_error
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.errors import EngineUnavailableError, MediaError, OverloadedError


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
