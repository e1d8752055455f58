"""The one SSE parser: comments, keep-alives, split reads, line endings, unterminated streams."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vlserve.bench.sse import SSEEvent, SSEParser


def parse(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


STREAM = (
    b": keep-alive\n\n"
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n'
    b":ping\n"
    b"event: error\ndata: line one\ndata: line two\n\n"
    b'data:{"usage":{"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent('{"choices":[{"delta":{"content":"hé"}}]}'),
    SSEEvent("line one\nline two", "error"),
    SSEEvent('{"usage":{"completion_tokens":2}}'),
    SSEEvent("[DONE]"),
]


def test_whole_stream_gives_events_and_skips_comments() -> None:
    assert parse([STREAM]) == EXPECTED


def test_every_single_split_point_gives_the_same_events() -> None:
    for cut in range(len(STREAM) + 1):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_byte_by_byte_including_split_utf8() -> None:
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_splits(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    assert parse([STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]) == EXPECTED


@given(st.sampled_from([b"\n", b"\r\n", b"\r"]), st.integers(min_value=1, max_value=7))
def test_all_line_endings_even_split_between_cr_and_lf(eol: bytes, size: int) -> None:
    stream = STREAM.replace(b"\n", eol)
    assert parse([stream[i : i + size] for i in range(0, len(stream), size)]) == EXPECTED


def test_stream_without_done_and_without_final_blank_line() -> None:
    # Some servers close right after the last data line: close() still dispatches it.
    assert parse([b'data: {"a":1}\n\ndata: {"b":2}']) == [SSEEvent('{"a":1}'), SSEEvent('{"b":2}')]
    assert parse([b'data: {"a":1}\n']) == [SSEEvent('{"a":1}')]


def test_only_keepalives_gives_nothing() -> None:
    assert parse([b": ping\n\n: ping\n\n\n\n"]) == []


def test_field_without_space_and_unknown_fields() -> None:
    assert parse([b"id: 7\nretry: 10\nfoo: bar\ndata:x\n\n"]) == [SSEEvent("x")]


def test_empty_data_line_is_an_event_with_empty_data() -> None:
    assert parse([b"data\n\n"]) == [SSEEvent("")]
