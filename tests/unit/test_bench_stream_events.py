"""Stream chunks → tokens, TTFT, usage and errors, on streams as real servers send them."""

from __future__ import annotations

import json

from vlserve.bench.client import RequestResult, _on_event
from vlserve.bench.sse import SSEParser


def apply(stream: bytes) -> tuple[RequestResult, str, bool]:
    result, pieces, done = RequestResult("r", "r"), list[str](), False
    parser = SSEParser()
    for n, event in enumerate([*parser.feed(stream), *parser.close()]):
        done = _on_event(event, 0.1 * (n + 1), result, pieces) or done
    return result, "".join(pieces), done


def frames(*objs: object) -> bytes:
    return b"".join(
        b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs
    )


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }


def test_vlserve_stream_role_header_then_tokens_then_usage() -> None:
    # As vlserve sends it: a role header with "", "role": null on content chunks, usage last.
    result, text, done = apply(frames(
        chunk({"role": "assistant", "content": ""}),
        chunk({"role": None, "content": "A"}),
        chunk({"role": None, "content": ""}),  # a token that decodes to ""
        chunk({"role": None, "content": "B"}),
        chunk({"role": None, "content": None}, "length"),
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}},
        b"[DONE]",
    ))  # fmt: skip
    assert done and text == "AB" and result.error is None
    assert result.chunk_times_s == [0.2, 0.30000000000000004, 0.4]  # the header is not a token
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == (9, 3, 12)
    assert result.finish_reason == "length"


def test_reasoning_and_tool_call_chunks_count_as_output() -> None:
    result, text, _ = apply(
        frames(chunk({"reasoning_content": "hmm"}), chunk({"tool_calls": [{"index": 0}]}))
    )
    assert len(result.chunk_times_s) == 2 and text == ""


def test_error_chunk_and_vllm_style_error_object() -> None:
    result, _, _ = apply(frames(chunk({"content": "A"}), {"error": {"message": "engine died"}}))
    assert result.error == "error in stream: engine died"
    result, _, _ = apply(frames({"object": "error", "message": "bad", "code": 400}))
    assert result.error is not None and "bad" in result.error


def test_invalid_json_is_an_error_and_blank_data_is_ignored() -> None:
    result, _, _ = apply(b"data: \n\n" + frames(chunk({"content": "A"})))
    assert result.error is None and len(result.chunk_times_s) == 1
    result, _, _ = apply(b"data: {oops\n\n")
    assert result.error is not None and "invalid JSON" in result.error


def test_usage_without_total_is_completed() -> None:
    result, _, _ = apply(
        frames({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}})
    )
    assert result.total_tokens == 7


def test_request_body_asks_for_usage_and_extra_body_can_remove_fields() -> None:
    from vlserve.bench.client import build_body
    from vlserve.bench.config import RequestOptions
    from vlserve.bench.dataset import BenchRequest

    request = BenchRequest("a", [{"role": "user", "content": "hi"}], "t", max_tokens=7)
    body = json.loads(build_body(request, RequestOptions(ignore_eos=True), "m"))
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    extra = {"stream_options": None, "max_tokens": None, "max_completion_tokens": 9, "top_p": 0.5}
    body = json.loads(build_body(request, RequestOptions(extra_body=extra), "m"))
    assert "stream_options" not in body and "max_tokens" not in body
    assert (body["max_completion_tokens"], body["top_p"]) == (9, 0.5)
    body = json.loads(build_body(request, RequestOptions(stream=False), "m"))
    assert body["stream"] is False and "stream_options" not in body
