"""`--log-format json` and W3C trace context against a real server: one JSON object per line,
the request line's fields with the client address and trace id, the client's traceparent
passed on to the media host the request makes the server fetch from, and each request sent as
an OpenTelemetry span to an OTLP/HTTP collector (`--otlp-traces-endpoint`)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import (
    QuietHandler,
    ServerProcess,
    png_data_url,
    serving,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PNG = base64.b64decode(png_data_url(64, 64).split(",", 1)[1])


@pytest.fixture(scope="module")
def media_host() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("traceparent"))
            self.answer("image/png", PNG)

    with serving(Handler) as url:
        yield url, seen


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[str, list[Span]]]:
    """An OTLP/HTTP trace collector: the spans of every export it receives."""
    spans: list[Span] = []

    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802
            request = ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    spans.extend(scope.spans)
            self.answer("application/x-protobuf", b"")

    with serving(Handler) as url:
        yield url + "/v1/traces", spans


@pytest.fixture(scope="module")
def json_server(
    tiny_model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    collector: tuple[str, list[Span]],
) -> Iterator[ServerProcess]:
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("jsonlog"),
        "--log-format",
        "json",
        "--otlp-traces-endpoint",
        collector[0],
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},  # the SDK batches spans for 5 s by default
    )
    yield srv
    stop_server(srv)


def _chat(srv: ServerProcess, content: object, headers: dict[str, str]) -> httpx.Response:
    body = {"model": srv.model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def _request_line(srv: ServerProcess, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in srv.log_path.read_text().splitlines():
            if f'"id": "{request_id}"' in line:
                return json.loads(line)
        time.sleep(0.1)
    raise AssertionError(f"no log line for {request_id}:\n{srv.log_tail()}")


def test_every_line_is_one_json_object(json_server: ServerProcess) -> None:
    assert _chat(json_server, "hi", {"x-request-id": "j1"}).status_code == 200
    entry = _request_line(json_server, "j1")
    lines = json_server.log_path.read_text().splitlines()
    objects = [json.loads(line) for line in lines if line.startswith("{")]
    # the startup lines, uvicorn's included, are JSON too (a traceback may follow a line)
    assert len(objects) >= 3 and objects[0]["level"] in ("info", "warning")
    assert {"time", "level", "logger", "message"} <= set(entry)
    assert entry["logger"] == "vlserve.request" and entry["message"] == "request"
    assert entry["status"] == 200 and entry["completion_tokens"] == 2
    assert entry["client"].startswith("127.0.0.1:")
    assert len(entry["trace_id"]) == 32 and "traceparent" not in entry  # a new trace


def test_traceparent_is_logged_and_passed_on_to_the_media_host(
    json_server: ServerProcess, media_host: tuple[str, list[str | None]]
) -> None:
    url, seen = media_host
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"{url}/cat.png"}},
    ]
    r = _chat(json_server, content, {"x-request-id": "j2", "traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    entry = _request_line(json_server, "j2")
    assert entry["trace_id"] == TRACE_ID and entry["traceparent"] == TRACEPARENT
    sent = seen[-1]
    assert sent is not None and sent.startswith(f"00-{TRACE_ID}-") and sent.endswith("-01")
    assert sent != TRACEPARENT  # the server's own span is the media request's parent


def test_a_malformed_traceparent_starts_a_new_trace(json_server: ServerProcess) -> None:
    bad = "00-" + "0" * 32 + "-00f067aa0ba902b7-01"  # an all-zero trace id is invalid
    assert _chat(json_server, "hi", {"x-request-id": "j3", "traceparent": bad}).status_code == 200
    entry = _request_line(json_server, "j3")
    assert entry["trace_id"] != "0" * 32 and "traceparent" not in entry


def _span(spans: list[Span], request_id: str) -> Span:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for span in list(spans):
            attrs = {a.key: a.value for a in span.attributes}
            if attrs["vlserve.request_id"].string_value == request_id:
                return span
        time.sleep(0.1)
    raise AssertionError(f"no span for {request_id} among {len(spans)}")


def test_a_request_is_exported_as_the_server_span_of_its_trace(
    json_server: ServerProcess,
    media_host: tuple[str, list[str | None]],
    collector: tuple[str, list[Span]],
) -> None:
    url, seen = media_host
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"{url}/dog.png"}},
    ]
    r = _chat(json_server, content, {"x-request-id": "o1", "traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    span = _span(collector[1], "o1")
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == "00f067aa0ba902b7"
    # the span the media host was told is its parent is the one exported
    assert seen[-1] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"
    assert span.name == "POST /v1/chat/completions" and span.kind == Span.SPAN_KIND_SERVER
    attrs = {a.key: a.value for a in span.attributes}
    usage = r.json()["usage"]
    assert attrs["gen_ai.usage.input_tokens"].int_value == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"].int_value == usage["completion_tokens"] == 2
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["gen_ai.request.model"].string_value == json_server.model
    ttft_s, e2e_s = (
        attrs[f"gen_ai.latency.{k}"].double_value for k in ("time_to_first_token", "e2e")
    )
    assert 0 < ttft_s <= e2e_s
    assert abs(span.end_time_unix_nano - span.start_time_unix_nano - e2e_s * 1e9) < 1_000


def test_a_caller_that_does_not_sample_gets_no_span_and_a_root_does(
    json_server: ServerProcess, collector: tuple[str, list[Span]]
) -> None:
    unsampled = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
    assert _chat(json_server, "hi", {"x-request-id": "o2", "traceparent": unsampled}).is_success
    assert _chat(json_server, "hi", {"x-request-id": "o3"}).is_success
    root = _span(collector[1], "o3")  # exported after o2 (one server, requests in turn)
    assert not root.parent_span_id and root.trace_id.hex() != TRACE_ID
    ids = [
        {a.key: a.value for a in s.attributes}["vlserve.request_id"].string_value
        for s in collector[1]
    ]
    assert "o2" not in ids
