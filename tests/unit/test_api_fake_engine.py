"""The API against a fake EngineClient: routes, serving and errors, in milliseconds, no model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from vlserve.api.app import create_app
from vlserve.config import ServerConfig
from vlserve.engine.client import EngineState, ModelInfo
from vlserve.engine.config import EngineConfig
from vlserve.engine.prompt import ChatPrompt
from vlserve.engine.request import FinishReason, SamplingParams, TokenEvent
from vlserve.engine.stream import RequestStream
from vlserve.errors import ContextLengthError, OverloadedError


class FakeEngine:
    """Answers every prompt with the words of its last text, one event per word."""

    def __init__(self) -> None:
        self.state = EngineState.READY
        self.model_info = ModelInfo("/models/fake", 4096, 1000, None, "cpu", "float32")
        self.num_running = 0
        self.num_waiting = 0
        self.stalled_s = 0.0
        self.calls: list[tuple[ChatPrompt, SamplingParams, str]] = []
        self.refuse: Exception | None = None

    def start(self) -> None:
        pass

    def cache_bytes(self) -> dict[str, int]:
        return {"processed_media": 0, "encoder": 0}

    async def wait_ready(self) -> None:
        pass

    def shutdown(self, timeout_s: float = 10.0) -> None:
        pass

    async def generate(
        self, prompt: ChatPrompt, params: SamplingParams, request_id: str
    ) -> RequestStream:
        if self.refuse is not None:
            raise self.refuse
        self.calls.append((prompt, params, request_id))
        words = prompt.messages[-1]["content"][-1]["text"].split(" ")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        for i, word in enumerate(words):  # the choices' events interleaved
            last = i == len(words) - 1
            for choice in range(params.n):
                queue.put_nowait(
                    TokenEvent(
                        word + ("" if last else " "),
                        (i,),
                        7,
                        i + 1,
                        FinishReason.STOP if last else None,
                        num_cached_tokens=3,
                        index=choice,
                    )
                )
        return RequestStream(request_id, queue, lambda: None, lambda: (7, 0), n=params.n)


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


async def _with_app(fake: FakeEngine, body: dict) -> httpx.Response:
    app = create_app(ServerConfig(EngineConfig("/models/fake"), served_model_names=("fake",)), fake)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(100):  # the app marks itself ready once the engine is
            if app.state.vl.defaults is not None:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post("/v1/chat/completions", json=body)


def _body(**kw: object) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": "hello big world"}], **kw}


def test_completion_usage_and_params_reach_the_engine(fake: FakeEngine) -> None:
    resp = asyncio.run(_with_app(fake, _body(max_tokens=9, seed=4, cache_salt="t1")))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["choices"][0]["message"]["content"] == "hello big world"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    prompt, params, _ = fake.calls[0]
    assert prompt.cache_salt == "t1" and params.max_tokens == 9 and params.seed == 4
    assert params.max_tokens == 9


def test_max_tokens_left_out_is_the_engines_choice(fake: FakeEngine) -> None:
    asyncio.run(_with_app(fake, _body()))
    assert fake.calls[0][1].max_tokens is None


def test_streamed_chunks(fake: FakeEngine) -> None:
    resp = asyncio.run(_with_app(fake, _body(stream=True, stream_options={"include_usage": True})))
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "hello big world"
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


@pytest.mark.parametrize(
    ("error", "status", "param"),
    [
        (ContextLengthError("too long", param="max_tokens"), 400, "max_completion_tokens"),
        (OverloadedError("busy"), 429, None),
    ],
)
def test_engine_refusals_map_to_openai_errors(
    fake: FakeEngine, error: Exception, status: int, param: str | None
) -> None:
    fake.refuse = error
    resp = asyncio.run(_with_app(fake, _body(max_completion_tokens=5)))
    assert resp.status_code == status
    assert resp.json()["error"]["param"] == param


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CALL_TEXT = 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n</tool_call>'


def test_n_choices_with_tool_calls_streamed_and_not(fake: FakeEngine) -> None:
    body = _body(messages=[{"role": "user", "content": CALL_TEXT}], tools=TOOLS, n=2)
    out = asyncio.run(_with_app(fake, body)).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice in out["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Sure."
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "f", "arguments": '{"a": [1, 2]}'}
    assert (
        out["usage"]["completion_tokens"] == 2 * len(CALL_TEXT.split(" "))
        and out["usage"]["prompt_tokens"] == 7
    )
    resp = asyncio.run(_with_app(fake, {**body, "stream": True}))
    chunks = [
        json.loads(line[6:]) for line in resp.text.splitlines()[:-2] if line.startswith("data: ")
    ]
    arguments = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            assert "<tool" not in (choice["delta"].get("content") or "")
            for delta in choice["delta"].get("tool_calls", []):
                arguments[choice["index"]] += delta["function"].get("arguments", "")
    assert arguments == {0: '{"a": [1, 2]}', 1: '{"a": [1, 2]}'}


def test_tool_choice_none_and_no_tools_leave_the_text(fake: FakeEngine) -> None:
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        body = _body(messages=[{"role": "user", "content": CALL_TEXT}], **extra)
        message = asyncio.run(_with_app(fake, body)).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": CALL_TEXT}


def _video_body(clip: bytes, stream: bool) -> dict:
    import base64

    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": stream}


async def _post_raw(fake: FakeEngine, body: dict) -> httpx.Response:
    """As _with_app, but an unhandled error is answered (500) instead of raised in the test."""
    app = create_app(ServerConfig(EngineConfig("/models/fake"), served_model_names=("fake",)), fake)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(100):
            if app.state.vl.defaults is not None:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_in_video_decoding_is_a_500_with_a_trace_not_a_400(
    fake: FakeEngine,
    stream: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PyAV 19 removed an argument of av.open: every video raised TypeError, which was answered
    400 "not a valid video", blaming the user. A non-PyAV error is the server's fault."""
    pytest.importorskip("av")
    import vlserve.media.video as video
    from vlserve.testing.video import make_clip

    clip, other = make_clip(), make_clip(frames=12)  # other: not in the decoded-media cache
    ok = asyncio.run(_post_raw(fake, _video_body(clip, stream)))
    assert ok.status_code == 200, ok.text
    bad = asyncio.run(_post_raw(fake, _video_body(clip[: len(clip) // 2], stream)))
    assert bad.status_code == 400 and bad.json()["error"]["param"] is not None

    def removed_argument(*args: object, **kwargs: object) -> None:
        raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")

    monkeypatch.setattr(video.av, "open", removed_argument)
    with caplog.at_level("ERROR"):
        resp = asyncio.run(_post_raw(fake, _video_body(other, stream)))
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "internal_error"
    assert "metadata_errors" not in resp.text  # no internals in the answer
    assert any(r.exc_info and "metadata_errors" in str(r.exc_info[1]) for r in caplog.records)


def test_a_reply_sent_back_as_history_with_model_dump_is_accepted(fake: FakeEngine) -> None:
    """`messages.append(reply.choices[0].message.model_dump())`: the SDK's dump carries refusal,
    audio, function_call and annotations (null or empty); OpenAI accepts and ignores them."""
    from openai.types.chat import ChatCompletionMessage

    reply = ChatCompletionMessage(role="assistant", content="hello there", refusal=None)
    dumped = reply.model_dump()
    assert {"refusal", "audio", "function_call", "annotations"} <= set(dumped)
    dumped["annotations"] = []
    messages = [
        {"role": "user", "content": "hi"},
        dumped,
        {"role": "user", "content": "and then"},
    ]
    resp = asyncio.run(_with_app(fake, {"model": "fake", "messages": messages}))
    assert resp.status_code == 200, resp.text
    prompt, _, _ = fake.calls[0]
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "user"]
    too_long = {**dumped, "refusal": "x" * 2_000_000}
    bad = asyncio.run(_with_app(fake, {"model": "fake", "messages": [too_long]}))
    assert bad.status_code == 400


def test_a_tool_message_without_its_call_id_is_a_400(fake: FakeEngine) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": "22 degrees"},
        {"role": "user", "content": "so?"},
    ]
    resp = asyncio.run(_with_app(fake, {"model": "fake", "messages": messages}))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "messages[1].tool_call_id"
    assert error["type"] == "invalid_request_error" and "tool_call_id" in error["message"]
    assert not fake.calls


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},  # 16 pairs at most
        {"k" * 65: "v"},  # keys up to 64 characters
        {"k": "v" * 513},  # values up to 512
    ],
    ids=["pairs", "key", "value"],
)
def test_metadata_has_openais_limits(fake: FakeEngine, metadata: dict) -> None:
    resp = asyncio.run(_with_app(fake, _body(metadata=metadata)))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith("metadata")
    ok = {f"k{i}": "v" * 512 for i in range(15)} | {"k" * 64: "v"}  # at the limits
    assert asyncio.run(_with_app(fake, _body(metadata=ok))).status_code == 200
