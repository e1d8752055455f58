"""api/plan.py: one planning pass over a chat request; chat.split_messages over typed messages;
the engine's neutral error fields named back in the request's words."""

from __future__ import annotations

import pytest

from vlserve.api.chat import split_messages
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.errors import InvalidRequestError

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
