"""Prometheus metrics (/metrics) and the per-request record they and the request log are made from."""

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
    from vlserve.engine.request import StepStats

disable_created_metrics()  # the *_created series double the output and nothing here reads them

# Route labels are the known paths only: a scanner probing random URLs must not grow the series.
KNOWN_ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions"})
_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
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
    ttft_s: float | None = None
    queue_s: float | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    api_key_index: int | None = None  # which of the server's API keys authenticated it
    client: str | None = None  # host:port of the peer (nginx's, behind launch)
    trace_id: str | None = None  # W3C trace id: the client's traceparent's, or a new one
    traceparent: str | None = None  # the client's, when it sent a valid one

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start


class Metrics:
    """One registry per app, so several apps in one process (tests) never share series."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vlserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.e2e = Histogram(
            "vlserve_e2e_request_latency_seconds",
            "chat completion latency, arrival to last byte",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "vlserve_time_to_first_token_seconds",
            "arrival to the first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue = Histogram(
            "vlserve_queue_time_seconds",
            "time a prepared request waited for the engine to start its prefill",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("vlserve_prompt_tokens", "prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "vlserve_completion_tokens", "generated tokens", registry=r
        )
        self.finished = Counter(
            "vlserve_request_finish", "finished generations by reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "vlserve_batch_size", "rows in each decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.cached_tokens = Counter(
            "vlserve_prompt_cached_tokens", "prompt tokens served from the prefix cache", registry=r
        )
        self.step_tokens = Histogram(
            "vlserve_step_tokens",
            "positions computed by each engine step (prefill and decode)",
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
            registry=r,
        )
        self.preemptions = Counter(
            "vlserve_preemptions", "running requests preempted for KV space", registry=r
        )
        self.prefix_hits = Counter(
            "vlserve_prefix_cache_hit_tokens",
            "prompt tokens the prefix cache gave requests as they started",
            registry=r,
        )
        self.kv_usage = Gauge(
            "vlserve_kv_cache_usage_ratio", "KV cache blocks in use after the last step", registry=r
        )
        self.running = Gauge("vlserve_num_requests_running", "requests decoding", registry=r)
        self.waiting = Gauge("vlserve_num_requests_waiting", "requests queued", registry=r)

    def watch_engine(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the engine's gauges at scrape time (never stale, no bookkeeping)."""
        self.running.set_function(lambda: float(running()))
        self.waiting.set_function(lambda: float(waiting()))

    def observe_step(self, step: StepStats) -> None:
        """The engine's ``on_step`` hook (inference thread): the step's plan and the KV cache."""
        if not step.is_prefill:
            self.batch_size.observe(step.rows)
        self.step_tokens.observe(step.tokens)
        if step.preemptions:
            self.preemptions.inc(step.preemptions)
        if step.prefix_hit_tokens:
            self.prefix_hits.inc(step.prefix_hit_tokens)
        self.kv_usage.set(step.kv_blocks_used / max(step.kv_blocks_total, 1))

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
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens)
        if record.cached_tokens:
            self.cached_tokens.inc(record.cached_tokens)
        if record.finish_reason is not None:
            self.finished.labels(record.finish_reason).inc()

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
            registry=self.registry,
        ).set_function(lambda: float(decoding()))
        held = Gauge(
            "vlserve_cache_bytes",
            "bytes held by each content cache (decoded media, processed media, encoder outputs)",
            ["cache"],
            registry=self.registry,
        )
        for name in caches():
            held.labels(name).set_function(lambda name=name: float(caches().get(name, 0)))
