"""Requests as OpenTelemetry spans (api/otel.py), through the SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from vlserve.api.metrics import RequestRecord
from vlserve.api.otel import RequestSpans
from vlserve.tracecontext import TraceParent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _record(traceparent: str | None, **kw: object) -> RequestRecord:
    incoming = TraceParent.parse(traceparent)
    span = incoming.child() if incoming else TraceParent.new(sampled=True)
    record = RequestRecord("req-1", "POST", "/v1/chat/completions", **kw)  # type: ignore[arg-type]
    record.trace_id, record.span_id, record.sampled = span.trace_id, span.parent_id, span.sampled
    record.traceparent = incoming.header() if incoming else None
    return record


def _spans() -> tuple[RequestSpans, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return RequestSpans(exporter, batch=False), exporter


def test_a_generation_is_the_server_hop_of_the_callers_trace() -> None:
    spans, exporter = _spans()
    record = _record(
        f"00-{TRACE_ID}-{CLIENT_SPAN}-01",
        status=200,
        model="tiny",
        prompt_tokens=12,
        completion_tokens=5,
        cached_tokens=8,
        ttft_s=0.25,
        queue_s=0.125,
        finish_reason="length",
        client="10.0.0.7:5123",
    )
    spans.export(record, 1.5)
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /v1/chat/completions" and span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.context.span_id:016x}" == record.span_id  # what media hosts saw as parent
    assert f"{span.parent.span_id:016x}" == CLIENT_SPAN and span.parent.is_remote
    assert span.end_time - span.start_time == 1_500_000_000
    assert span.start_time == record.wall_start_ns
    attrs = dict(span.attributes)
    assert attrs == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "vlserve.request_id": "req-1",
        "client.address": "10.0.0.7",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "tiny",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.usage.cache_read.input_tokens": 8,
        "gen_ai.latency.e2e": 1.5,
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.latency.time_to_first_token": 0.25,
        "gen_ai.latency.time_in_queue": 0.125,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "vlserve"


def test_a_caller_that_does_not_sample_is_not_exported() -> None:
    spans, exporter = _spans()
    spans.export(_record(f"00-{TRACE_ID}-{CLIENT_SPAN}-00", status=200), 0.1)
    assert exporter.get_finished_spans() == ()


def test_a_request_without_traceparent_roots_a_trace() -> None:
    spans, exporter = _spans()
    record = _record(None, status=200)
    spans.export(record, 0.1)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and f"{span.context.trace_id:032x}" == record.trace_id
    assert "gen_ai.request.model" not in span.attributes  # no generation: HTTP's attributes only


def test_server_errors_mark_the_span_and_client_errors_do_not() -> None:
    spans, exporter = _spans()
    spans.export(_record(None, status=503, error_code="engine_unavailable"), 0.1)
    spans.export(_record(None, status=400, error_code="invalid_value"), 0.1)
    failed, refused = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "engine_unavailable"
    assert refused.status.status_code is StatusCode.UNSET
    assert refused.attributes["error.type"] == "invalid_value"


def test_without_the_extra_the_flag_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_exporter(name: str, *args: object, **kw: object) -> object:
        if name.startswith("opentelemetry.exporter"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_exporter)
    with pytest.raises(ValueError, match=r"vlserve\[otel\]"):
        RequestSpans.to_endpoint("http://127.0.0.1:4318/v1/traces")
