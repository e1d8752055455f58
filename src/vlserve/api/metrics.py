"""Prometheus metrics (/metrics) and the per-request record they and the request log are made from.

The engine's series follow vLLM's semantics and carry its ``model_name`` label (the first served
name), so dashboards built for vLLM need only their names changed: docs/METRICS.md has the map,
deploy/grafana/vlserve.json a dashboard (tests/unit/test_metrics_dashboard.py keeps them true).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if TYPE_CHECKING:
    from vlserve.engine.client import EngineClient
    from vlserve.engine.request import StepStats, TokenEvent

disable_created_metrics()  # the *_created series double the output and nothing here reads them

# Route labels are the known paths only: a scanner probing random URLs must not grow the series.
KNOWN_ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions"})
_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
_TOKEN_GAP_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class RequestRecord:
    """What one HTTP request did; routes fill in the generation fields as they learn them."""

    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # all choices together
    choice_tokens: dict[int, int] = field(default_factory=dict)  # completion tokens by choice
    cached_tokens: int = 0  # of the prompt, from the prefix cache
    last_token_at: dict[int, float] = field(default_factory=dict)  # by choice (perf_counter)
    ttft_s: float | None = None
    queue_s: float | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    api_key_index: int | None = None  # which of the server's API keys authenticated it
    client: str | None = None  # host:port of the peer (nginx's, behind launch)
    trace_id: str | None = None  # W3C trace id: the client's traceparent's, or a new one
    traceparent: str | None = None  # the client's, when it sent a valid one
    span_id: str | None = None  # this server's span in that trace (the media fetches' parent)
    sampled: bool = False  # the trace's sampled flag: exported as an OpenTelemetry span if set
    wall_start_ns: int = field(default_factory=time.time_ns)  # the span's start (epoch)

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start


class Metrics:
    """One registry per app, so several apps in one process (tests) never share series.

    ``model_name`` labels every series of the engine and its requests, as vLLM's do; HTTP
    requests by route are counted whatever the model.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.model_name = model_name
        self.requests = Counter(
            "vlserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(
                model_name
            )

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["model_name"], registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name"], registry=r).labels(model_name)

        self.e2e = histogram(
            "vlserve_e2e_request_latency_seconds",
            "chat completion latency, arrival to last byte",
            _LATENCY_BUCKETS_S,
        )
        self.ttft = histogram(
            "vlserve_time_to_first_token_seconds",
            "arrival to the first generated token",
            _LATENCY_BUCKETS_S,
        )
        self.tpot = histogram(
            "vlserve_time_per_output_token_seconds",
            "time between two consecutive tokens of one choice (inter-token latency)",
            _TOKEN_GAP_BUCKETS_S,
        )
        self.queue = histogram(
            "vlserve_queue_time_seconds",
            "time a prepared request waited for the engine to start its prefill",
            _LATENCY_BUCKETS_S,
        )
        self.prompt_tokens = counter(
            "vlserve_prompt_tokens", "prompt tokens, counted as each request starts generating"
        )
        self.completion_tokens = counter(
            "vlserve_completion_tokens", "generated tokens, counted as they are generated"
        )
        self._finished = Counter(
            "vlserve_request_finish",
            "finished generations by reason",
            ["model_name", "reason"],
            registry=r,
        )
        self.batch_size = histogram(
            "vlserve_batch_size", "rows in each decode step", _BATCH_BUCKETS
        )
        self.cached_tokens = counter(
            "vlserve_prompt_cached_tokens", "prompt tokens served from the prefix cache"
        )
        self.step_tokens = histogram(
            "vlserve_step_tokens",
            "positions computed by each engine step (prefill and decode)",
            (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        )
        self.preemptions = counter(
            "vlserve_preemptions", "running requests preempted for KV space"
        )
        self.prefix_queries = counter(
            "vlserve_prefix_cache_query_tokens",
            "prompt tokens looked up in the prefix cache as requests started",
        )
        self.prefix_hits = counter(
            "vlserve_prefix_cache_hit_tokens",
            "prompt tokens the prefix cache gave requests as they started",
        )
        self.kv_usage = gauge(
            "vlserve_kv_cache_usage_ratio", "KV cache blocks in use after the last step (0-1)"
        )
        self.running = gauge("vlserve_num_requests_running", "requests decoding")
        self.waiting = gauge("vlserve_num_requests_waiting", "requests queued")
        self.stalled = gauge(
            "vlserve_engine_stalled_seconds",
            "seconds since the engine last finished a step while work is pending (0 while idle)",
        )

    def watch_engine(self, engine: EngineClient) -> None:
        """Read the engine's gauges at scrape time (never stale, no bookkeeping)."""
        self.running.set_function(lambda: float(engine.num_running))
        self.waiting.set_function(lambda: float(engine.num_waiting))
        self.stalled.set_function(lambda: float(engine.stalled_s))

    def observe_step(self, step: StepStats) -> None:
        """The engine's ``on_step`` hook (inference thread): the step's plan and the KV cache."""
        if not step.is_prefill:
            self.batch_size.observe(step.rows)
        self.step_tokens.observe(step.tokens)
        if step.preemptions:
            self.preemptions.inc(step.preemptions)
        if step.prefix_query_tokens:
            self.prefix_queries.inc(step.prefix_query_tokens)
        if step.prefix_hit_tokens:
            self.prefix_hits.inc(step.prefix_hit_tokens)
        self.kv_usage.set(step.kv_blocks_used / max(step.kv_blocks_total, 1))

    def observe_event(self, record: RequestRecord, event: TokenEvent) -> None:
        """Each of a request's events (event loop), before ``record`` takes it in: tokens as
        they come (a long generation moves the counters while it runs), and the gap since the
        choice's previous token."""
        if not record.prompt_tokens and event.num_prompt_tokens:
            self.prompt_tokens.inc(event.num_prompt_tokens)
        new = event.num_completion_tokens - record.choice_tokens.get(event.index, 0)
        if new <= 0:
            return
        self.completion_tokens.inc(new)
        now = time.perf_counter()
        previous = record.last_token_at.get(event.index)
        if previous is not None:
            self.tpot.observe(now - previous)
        record.last_token_at[event.index] = now

    def observe(self, record: RequestRecord, duration_s: float) -> None:
        route = record.path if record.path in KNOWN_ROUTES else "other"
        if record.path.startswith("/v1/models/"):
            route = "/v1/models/{model}"  # one series, whatever the names asked for
        self.requests.labels(route, str(record.status)).inc()
        if record.model is None:
            return  # not a generation (or refused before its model was known)
        if record.status == 200:
            self.e2e.observe(duration_s)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
        if record.queue_s is not None:
            self.queue.observe(record.queue_s)
        if record.cached_tokens:
            self.cached_tokens.inc(record.cached_tokens)
        if record.finish_reason is not None:
            self._finished.labels(self.model_name, record.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- host memory held by media and caches (issue #23 item 3), read at scrape time ---------

    def watch_memory(
        self, decoding: Callable[[], int], caches: Callable[[], dict[str, int]]
    ) -> None:
        """Gauges of the bytes decodes in progress hold (``decoding``) and of each content
        cache (``caches``: name -> bytes, the same names at every call)."""
        Gauge(
            "vlserve_media_decoding_bytes",
            "host memory reserved by image and video decodes in progress (--media-memory-mb)",
            ["model_name"],
            registry=self.registry,
        ).labels(self.model_name).set_function(lambda: float(decoding()))
        held = Gauge(
            "vlserve_cache_bytes",
            "bytes held by each content cache (decoded media, processed media, encoder outputs)",
            ["model_name", "cache"],
            registry=self.registry,
        )
        for name in caches():
            held.labels(self.model_name, name).set_function(
                lambda name=name: float(caches().get(name, 0))
            )
