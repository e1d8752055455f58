"""The streaming tool-call parser: pieces are the same however the text is split."""

from __future__ import annotations

import json

import pytest

from vlserve.api.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Piece,
    ToolCallParser,
)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"a": 1}}}\n</tool_call>'


def _run(text: str, sizes: int | None) -> list[Piece]:
    parser = ToolCallParser()
    pieces: list[Piece] = []
    step = sizes or len(text) or 1
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i : i + step])
    return pieces + parser.finish()


def _summary(pieces: list[Piece]) -> tuple[str, list[tuple[str, str]]]:
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    calls: list[list[str]] = []
    for p in pieces:
        if isinstance(p, CallStart):
            assert p.index == len(calls) and p.id.startswith("call_")
            calls.append([p.name, ""])
        elif isinstance(p, CallArguments):
            calls[p.index][1] += p.text
    return content, [(n, a) for n, a in calls]


@pytest.mark.parametrize("size", [1, 2, 3, 7, None])
def test_split_anywhere_gives_the_same_calls(size: int | None) -> None:
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    content, calls = _summary(_run(text, size))
    assert content == "Let me check."  # the newlines around the calls are dropped
    assert calls == [
        ("get_weather", '{"city": "Paris", "n": {"a": 1}}'),
        ("get_weather", '{"city": "Oslo", "n": {"a": 1}}'),
    ]
    assert all(json.loads(a) for _, a in calls)


def test_no_tag_text_ever_reaches_content() -> None:
    parser = ToolCallParser()
    out: list[Piece] = []
    for ch in "Hi <tool_c":
        out += parser.feed(ch)
    assert "".join(p.text for p in out if isinstance(p, Content)) == "Hi"
    out = parser.feed("all>\n")
    assert out == []  # inside the tag now: nothing leaks
    start = parser.feed('{"name": "f", "arguments": {')
    assert [type(p) for p in start] == [CallStart, CallArguments]


def test_a_lookalike_is_released_when_it_cannot_be_a_tag() -> None:
    content, calls = _summary(_run("a <tool> b <tool_cal", 1))
    assert content == "a <tool> b <tool_cal" and calls == []


def test_arguments_stream_before_the_call_ends_but_hold_the_closing_brace() -> None:
    parser = ToolCallParser()
    parser.feed('<tool_call>{"name": "f", "arguments": {"a": {"b": 1}')
    assert parser.feed("") == []
    more = parser.feed(', "c": 2}}\n</tool_call>')
    assert [p.text for p in more if isinstance(p, CallArguments)] == ['}, "c": 2}']


def test_other_key_order_is_parsed_when_the_call_ends() -> None:
    text = '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
    assert _summary(_run(text, 4)) == ("", [("f", '{"x": 1}')])


@pytest.mark.parametrize(
    "block", ["<tool_call>not json</tool_call>", '<tool_call>{"name": 3}</tool_call>']
)
def test_a_block_that_is_not_a_call_stays_content(block: str) -> None:
    assert _summary(_run("x" + block, 3)) == ("x" + block, [])


def test_a_call_cut_short_keeps_what_it_has() -> None:
    content, calls = _summary(_run('ok<tool_call>{"name": "f", "arguments": {"a": "b', 5))
    assert content == "ok" and calls == [("f", '{"a": "b')]
    assert _summary(_run("<tool_call>{", 1)) == ("<tool_call>{", [])


def test_escaped_names_are_decoded() -> None:
    text = '<tool_call>{"name": "a\\"b", "arguments": {}}</tool_call>'
    assert _summary(_run(text, 2)) == ("", [('a"b', "{}")])


def test_whitespace_is_kept_inside_text_and_without_calls() -> None:
    assert _summary(_run("a  b\n\nc \n", 1)) == ("a  b\n\nc \n", [])
    content, calls = _summary(_run("a \n" + CALL + " \n", 1))
    assert content == "a" and len(calls) == 1
