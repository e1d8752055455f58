"""Each request as an OpenTelemetry span, sent over OTLP/HTTP: optional, with the ``otel``
extra installed (``pip install 'vlserve[otel]'``) and ``--otlp-traces-endpoint`` set (vLLM's
flag name).

The span is the server's hop of the request's W3C trace (``tracecontext.py``): the same trace
id, the client's span as its parent, and the span id the server already sent on to the media
hosts as theirs, so a collector joins all three. Sampling follows the caller: a ``traceparent``
whose sampled flag is off is not exported; a request without one starts a sampled trace.

Attributes: HTTP's semantic conventions (method, path, status, client address, ``error.type``)
and, for a generation, GenAI's (model, input/output tokens, finish reason) with vLLM's latency
names (``gen_ai.latency.*``: queue, time to first token, end to end). A 5xx marks the span an
error; a 4xx does not (the server worked as it should, per HTTP's conventions for servers).
Spans are batched and sent on the SDK's own thread; one that cannot be sent is dropped by the
SDK with a log line, never failing a request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlserve.api.metrics import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

EXTRA_HINT = "pip install 'vlserve[otel]'"


class RequestSpans:
    """Exports finished requests as spans. Called on the event loop's thread only (the
    middleware's request end): the ids handed to the SDK are set just before each span."""

    def __init__(self, exporter: SpanExporter, *, batch: bool = True) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self._ids = _RequestIds()
        # service.name "vlserve" unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say other
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": "vlserve"}),
            id_generator=self._ids.generator(),
            shutdown_on_exit=False,
        )
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("vlserve")

    @classmethod
    def to_endpoint(cls, endpoint: str) -> RequestSpans:
        """Spans sent to an OTLP/HTTP collector (``http://host:4318/v1/traces``); ValueError
        when the ``otel`` extra is not installed."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError(
                f"--otlp-traces-endpoint needs OpenTelemetry's SDK and OTLP exporter: "
                f"{EXTRA_HINT} ({exc})"
            ) from None
        return cls(OTLPSpanExporter(endpoint=endpoint))

    def export(self, record: RequestRecord, e2e_s: float) -> None:
        if not (record.trace_id and record.span_id and record.sampled):
            return
        from opentelemetry import trace

        self._ids.set(record.trace_id, record.span_id)
        context = None
        if record.traceparent is not None:  # the client's span is this one's parent
            _, trace_id, parent_id, flags = record.traceparent.split("-")[:4]
            parent = trace.SpanContext(
                int(trace_id, 16),
                int(parent_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(flags, 16)),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        span = self._tracer.start_span(
            f"{record.method} {record.path}",
            context=context,
            kind=trace.SpanKind.SERVER,
            attributes=attributes(record, e2e_s),
            start_time=record.wall_start_ns,
        )
        if record.status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.error_code))
        span.end(end_time=record.wall_start_ns + int(e2e_s * 1e9))

    def shutdown(self) -> None:
        """Send what is batched, then stop (at server exit)."""
        self.provider.shutdown()


def attributes(record: RequestRecord, e2e_s: float) -> dict[str, Any]:
    """The span's attributes for ``record``: HTTP's, and GenAI's for a generation."""
    out: dict[str, Any] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "http.response.status_code": record.status,
        "vlserve.request_id": record.request_id,
    }
    if record.client:
        out["client.address"] = record.client.rsplit(":", 1)[0]
    if record.error_code and record.status >= 400:
        out["error.type"] = record.error_code
    if record.model is None:
        return out
    out.update(
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": record.model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
            "gen_ai.latency.e2e": e2e_s,
        }
    )
    if record.finish_reason:
        out["gen_ai.response.finish_reasons"] = (record.finish_reason,)
    if record.ttft_s is not None:
        out["gen_ai.latency.time_to_first_token"] = record.ttft_s
    if record.queue_s is not None:
        out["gen_ai.latency.time_in_queue"] = record.queue_s
    return out


class _RequestIds:
    """The SDK's id generator, giving out the ids the request already has."""

    def __init__(self) -> None:
        self.trace_id = self.span_id = 0

    def set(self, trace_id: str, span_id: str) -> None:
        self.trace_id, self.span_id = int(trace_id, 16), int(span_id, 16)

    def generator(self) -> Any:
        from opentelemetry.sdk.trace.id_generator import IdGenerator

        ids = self

        class Generator(IdGenerator):
            def generate_span_id(self) -> int:
                return ids.span_id

            def generate_trace_id(self) -> int:
                return ids.trace_id

        return Generator()
