"""Hardening pieces in isolation: keys, request ids, limits middleware, metrics, bounds, faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from vlserve.api.accesslog import log_line
from vlserve.api.auth import ApiKeys
from vlserve.api.faults import FaultInjector, InjectedFault
from vlserve.api.metrics import Metrics, RequestRecord
from vlserve.api.middleware import RequestContextMiddleware, request_id_from
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.config import ServerConfig
from vlserve.engine.request import FinishReason, StepStats, TokenEvent

# -- API keys ----------------------------------------------------------------------------------


def test_keys_accept_any_configured_key_only() -> None:
    keys = ApiKeys(("alpha", "beta"))
    assert keys.check(b"Bearer alpha") and keys.check(b"bearer beta")
    assert not keys.check(b"Bearer alph") and not keys.check(b"Bearer alphaX")
    assert not keys.check(b"Basic alpha") and not keys.check(b"alpha") and not keys.check(None)
    assert not keys.check(b"Bearer ")


def test_api_keys_from_the_variable_are_split_and_deduplicated() -> None:
    from vlserve import settings

    config = settings.build(ServerConfig, None, {"VLSERVE_API_KEY": " c, ,a,c "})
    assert config.api_keys == ("c", "a")
    assert settings.build(ServerConfig, None, {}).api_keys == ()


def test_config_refuses_blank_keys_and_tiny_limits() -> None:
    with pytest.raises(ValueError):
        ServerConfig(api_keys=(" k",))
    with pytest.raises(ValueError):
        ServerConfig(max_request_body_bytes=10)


# -- request ids and the log line ----------------------------------------------------------------


def test_request_id_sanitised_capped_or_generated() -> None:
    assert request_id_from(b"abc-123_x.y:z") == "abc-123_x.y:z"
    assert request_id_from(b"1a2b3c4d-item@7#2") == "1a2b3c4d-item@7#2"  # vlserve bench's form
    assert request_id_from(b"dGVzdA+/=") == "dGVzdA+/="
    assert request_id_from(b"a\r\nb c<script>") == "abcscript"
    assert len(request_id_from(b"x" * 1000)) == 128
    generated = request_id_from(b"\n\n")
    assert len(generated) == 32 and generated != request_id_from(None)


def test_log_line_quotes_client_values() -> None:
    record = RequestRecord(request_id="r1", method="POST", path="/v1/x\nstatus=200 fake=1")
    record.status, record.model, record.finish_reason = 400, "m", "stop"
    line = log_line(record, 0.0123)
    assert "\n" not in line
    assert line.startswith("request id=r1 method=POST path=")
    assert 'path="/v1/x\\nstatus=200 fake=1"' in line
    assert "status=400" in line and "e2e_ms=12.3" in line and "ttft_ms" not in line


# -- the limits middleware, in process ---------------------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"size": len(body), "id": request.state.record.request_id})


def _app(metrics: Metrics, keys: tuple[str, ...] = ()) -> RequestContextMiddleware:
    inner = Starlette(
        routes=[
            Route("/v1/echo", _echo, methods=["POST"]),
            Route("/health", _echo, methods=["POST", "GET"]),
        ]
    )
    return _limits(inner, metrics, keys)


def _limits(app, metrics: Metrics, keys: tuple[str, ...] = ()) -> RequestContextMiddleware:  # type: ignore[no-untyped-def]
    return RequestContextMiddleware(
        app,
        metrics=metrics,
        max_body_bytes=1024,
        max_headers=12,
        max_header_bytes=2048,
        keys=ApiKeys(keys) if keys else None,
        body_routes=frozenset({("POST", "/v1/echo"), ("POST", "/health")}),
    )


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _request(app, method: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, **kwargs)


def test_body_cap_counts_streamed_bytes_without_content_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 200  # 2000 bytes, no Content-Length: only counting catches it

    metrics = Metrics()
    r = _run(_request(_app(metrics), "POST", "/v1/echo", content=chunks()))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]
    ok = _run(_request(_app(metrics), "POST", "/v1/echo", content=b"y" * 1024))
    assert ok.status_code == 200 and ok.json()["size"] == 1024


def test_declared_oversize_refused_before_reading() -> None:
    r = _run(
        _request(
            _app(Metrics()), "POST", "/v1/echo", content=b"{}", headers={"content-length": "5000"}
        )
    )
    assert r.status_code == 413


def test_too_many_headers() -> None:
    headers = {f"x-h{i}": "v" for i in range(20)}
    r = _run(_request(_app(Metrics()), "GET", "/health", headers=headers))
    assert r.status_code == 431 and r.json()["error"]["code"] == "too_many_headers"


def test_headers_too_large() -> None:
    r = _run(_request(_app(Metrics()), "GET", "/health", headers={"x-big": "b" * 3000}))
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


def test_request_id_echoed_and_passed_to_routes() -> None:
    r = _run(_request(_app(Metrics()), "POST", "/v1/echo", headers={"x-request-id": "abc 1"}))
    assert r.headers["x-request-id"] == "abc1" == r.json()["id"]


def test_unhandled_error_is_openai_shaped_and_hides_details() -> None:
    async def boom(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("internal detail that must not leak")

    app = RequestContextMiddleware(
        boom, metrics=Metrics(), max_body_bytes=1024, max_headers=12, max_header_bytes=2048
    )
    r = _run(_request(app, "GET", "/v1/boom"))
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "internal detail" not in r.text and r.headers["x-request-id"]


def test_keys_guard_v1_only_and_come_before_the_body() -> None:
    app = _app(Metrics(), keys=("s3cret",))
    missing = _run(_request(app, "POST", "/v1/echo"))
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer" and missing.headers["x-request-id"]
    wrong = _run(_request(app, "POST", "/v1/echo", headers={"authorization": "Bearer nope"}))
    assert wrong.status_code == 401 and "invalid" in wrong.json()["error"]["message"]
    good = _run(_request(app, "POST", "/v1/echo", headers={"authorization": "Bearer s3cret"}))
    assert good.status_code == 200
    assert _run(_request(app, "GET", "/health")).status_code == 200
    # a body over the cap from a client without a key: refused for the key, body never read
    unread = _run(_request(app, "POST", "/v1/echo", content=b"x" * 5000))
    assert unread.status_code == 401


def test_streamed_answer_cut_short_counts_as_client_closed() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise asyncio.CancelledError  # what a client disconnect does to a streaming response

    async def route(request: Request) -> StreamingResponse:
        return StreamingResponse(stream())

    metrics = Metrics()
    app = _limits(Starlette(routes=[Route("/v1/s", route)]), metrics)
    with pytest.raises(BaseException):  # noqa: B017 - the cancellation reaches the transport
        _run(_request(app, "GET", "/v1/s"))
    assert b'vlserve_requests_total{route="other",status="499"} 1.0' in metrics.render()


# -- metrics --------------------------------------------------------------------------------------


class _Gauges:
    num_running, num_waiting, stalled_s = 3, 7, 1.5


def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics("m")
    metrics.watch_engine(_Gauges())  # type: ignore[arg-type]
    record = RequestRecord(request_id="r", method="POST", path="/v1/chat/completions")
    record.status, record.model = 200, "m"
    for tokens in (1, 2, 3, 5):  # four events, the last with two tokens: three gaps
        event = TokenEvent("x", (0,), 10, tokens, FinishReason.LENGTH if tokens == 5 else None)
        metrics.observe_event(record, event)
        record.prompt_tokens, record.choice_tokens[0] = 10, tokens
    record.ttft_s, record.queue_s, record.finish_reason = 0.2, 0.01, "length"
    metrics.observe(record, 1.5)
    metrics.observe_step(StepStats(4, 4, False, 30, 120, 0, 0))  # a decode step of 4 rows
    metrics.observe_step(StepStats(2, 300, True, 60, 120, 48, 1, 300))  # a prefill, 1 preempted
    probe = RequestRecord(request_id="p", method="GET", path="/wp-admin/../x")
    probe.status = 404
    metrics.observe(probe, 0.001)
    text = metrics.render().decode()
    m = '{model_name="m"}'
    for line in (
        'vlserve_requests_total{route="/v1/chat/completions",status="200"} 1.0',
        'vlserve_requests_total{route="other",status="404"} 1.0',
        f"vlserve_prompt_tokens_total{m} 10.0",  # once per request
        f"vlserve_completion_tokens_total{m} 5.0",
        f"vlserve_time_per_output_token_seconds_count{m} 3.0",
        f"vlserve_e2e_request_latency_seconds_count{m} 1.0",
        'vlserve_time_to_first_token_seconds_bucket{le="0.25",model_name="m"} 1.0',
        f"vlserve_queue_time_seconds_count{m} 1.0",
        'vlserve_batch_size_bucket{le="4.0",model_name="m"} 1.0',
        f"vlserve_batch_size_count{m} 1.0",  # decode steps only
        'vlserve_step_tokens_bucket{le="1.0",model_name="m"} 0.0',
        'vlserve_step_tokens_bucket{le="8.0",model_name="m"} 1.0',
        'vlserve_step_tokens_bucket{le="512.0",model_name="m"} 2.0',
        f"vlserve_preemptions_total{m} 1.0",
        f"vlserve_prefix_cache_query_tokens_total{m} 300.0",
        f"vlserve_prefix_cache_hit_tokens_total{m} 48.0",
        f"vlserve_kv_cache_usage_ratio{m} 0.5",
        f"vlserve_num_requests_running{m} 3.0",
        f"vlserve_num_requests_waiting{m} 7.0",
        f"vlserve_engine_stalled_seconds{m} 1.5",
        'vlserve_request_finish_total{model_name="m",reason="length"} 1.0',
    ):
        assert line in text, line
    assert "_created" not in text


# -- parameter bounds ---------------------------------------------------------------------------

_OK = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]},
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 1_000_000}] * 5}, "messages"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "s" * 257}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"top_k": 10**7}, "top_k"),
        ({"n": 10**6}, "n"),
        ({"user": "u" * 257}, "user"),
        ({"model": "m" * 257}, "model"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    ],
)
def test_bounds(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**_OK, **extra})
    assert any(e["loc"][0] == field for e in info.value.errors())


def test_bounds_accept_the_edges() -> None:
    ChatCompletionRequest.model_validate(
        {**_OK, "seed": 2**63 - 1, "stop": ["s" * 256] * 16, "stop_token_ids": list(range(64))}
    )
    ChatCompletionRequest.model_validate({**_OK, "seed": -(2**63)})


def test_openapi_documents_nan_refusal_consistently() -> None:
    # json.loads accepts NaN; the model must refuse it rather than pass it to the sampler
    body = json.loads(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}'
    )
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


# -- fault injection ------------------------------------------------------------------------------


def test_fault_injector_fails_only_the_tracked_users_requests() -> None:
    assert FaultInjector.from_spec(None) is None and FaultInjector.from_spec("") is None
    faults = FaultInjector.from_spec("oom:victim")
    assert faults is not None
    faults.track("a", "someone else")
    faults.track("b", None)
    faults.track("c", "victim")
    faults.before_prefill("a")
    faults.before_prefill("b")
    with pytest.raises(InjectedFault, match="out of memory"):
        faults.before_prefill("c")
    faults.before_prefill("c")  # once per request: a recomputed request is not failed twice
    for bad in ("victim", "explode:victim", "error:"):
        with pytest.raises(ValueError):
            FaultInjector.from_spec(bad)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": "s" * 257}, "stop"),
        ({"stop": ["s" * 257]}, "stop[0]"),
        ({"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "messages[0].content"),
    ],
)
def test_bounded_union_members_name_the_field(extra: dict, param: str) -> None:
    from fastapi.exceptions import RequestValidationError

    from vlserve.api.errors import validation_error

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**_OK, **extra})
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    error = json.loads(validation_error(RequestValidationError(errors)).body)["error"]
    assert error["param"] == param


def test_denormal_sampling_values_become_their_floors() -> None:
    import torch

    from vlserve.api.convert import SamplingDefaults, to_sampling
    from vlserve.engine.sampling import SamplerState, sample

    req = ChatCompletionRequest.model_validate({**_OK, "temperature": 5e-324, "top_p": 5e-324})
    sp = to_sampling(req, SamplingDefaults(), vocab_size=50)
    assert sp.temperature == 0.0 and sp.top_p > 0
    req = ChatCompletionRequest.model_validate({**_OK, "temperature": 1.0, "top_p": 5e-324})
    sp = to_sampling(req, SamplingDefaults(), vocab_size=50)
    logits = torch.randn(1, 50)
    # the sampler must still have a distribution: only the most likely token survives
    state = SamplerState(sp, [1, 2], 50, torch.device("cpu"))
    assert sample(logits, [state])[0] == [int(logits.argmax())]
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**_OK, "repetition_penalty": 5e-324})
