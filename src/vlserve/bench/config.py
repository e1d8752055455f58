"""Frozen configuration of a benchmark run, built once from the CLI (or by library callers)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DatasetKind = Literal["jsonl", "image", "sample", "random"]
Routing = Literal["round-robin", "least-outstanding"]
Arrival = Literal["poisson", "constant"]
SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PROMPT = "Describe the image."


def normalize_endpoint(url: str) -> str:
    """``host:port``, ``http://h/v1`` or a full URL → ``http://…/v1/chat/completions``."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("empty endpoint")
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


@dataclass(frozen=True)
class DatasetConfig:
    """Where requests come from; ``kind`` picks the source."""

    kind: DatasetKind = "jsonl"
    inputs: tuple[str, ...] = ()
    image_file: str | None = None
    prompt: str = DEFAULT_PROMPT
    base_dir: str | None = None
    random_input_len: int = 128
    random_images: int = 0
    random_image_sizes: tuple[tuple[int, int], ...] = ((448, 448),)
    random_videos: int = 0  # synthetic videos per request (needs PyAV: the video extra)
    random_video_sizes: tuple[tuple[int, int], ...] = ((320, 240),)
    random_video_seconds: float = 4.0
    random_video_fps: float = 30.0
    random_turns: int = 1  # user turns per synthetic conversation; 1: single requests
    random_followup_len: int = 32  # tokens of each synthetic turn after the first
    num_random: int = 100
    limit: int = 0
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "jsonl" and not self.inputs:
            raise ValueError("no input: give --input GLOB, -f IMAGE or --dataset sample|random")
        if self.kind == "image" and not self.image_file:
            raise ValueError("dataset kind 'image' needs an image file")
        if self.random_input_len < 0 or self.random_images < 0 or self.limit < 0:
            raise ValueError("--random-input-len, --random-images and --limit must be >= 0")
        if self.random_turns < 1 or self.random_followup_len < 1:
            raise ValueError("--random-turns and --random-followup-len must be >= 1")
        if self.num_random <= 0:
            raise ValueError("the number of synthetic requests must be > 0")
        if not self.random_image_sizes:
            raise ValueError("at least one random image size is needed")
        self._check_videos()

    def _check_videos(self) -> None:
        if self.random_videos < 0:
            raise ValueError("--random-videos must be >= 0")
        if not self.random_video_sizes:
            raise ValueError("at least one random video size is needed")
        if any(w % 2 or h % 2 for w, h in self.random_video_sizes):
            raise ValueError("--random-video-size must be even in both dimensions (H.264 4:2:0)")
        if not 0 < self.random_video_seconds <= 3600:
            raise ValueError("--random-video-seconds must lie in (0, 3600]")
        if not 0 < self.random_video_fps <= 240:
            raise ValueError("--random-video-fps must lie in (0, 240]")


@dataclass(frozen=True)
class RequestOptions:
    """What each chat-completions request asks for."""

    model: str | None = None  # None: ask the first endpoint's /v1/models
    max_tokens: int = 256
    temperature: float = 0.0
    ignore_eos: bool = False
    stream: bool = True
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError("--max-tokens must be > 0")
        if self.timeout_s <= 0:
            raise ValueError("--timeout must be > 0")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for retryable failures only: connection errors, timeouts, 429 and 5xx."""

    max_retries: int = 3
    retry_delay_s: float = 1.0
    backoff: float = 2.0
    max_delay_s: float = 60.0  # caps both the backoff and a server's Retry-After

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.retry_delay_s < 0 or self.backoff < 1:
            raise ValueError("--max-retries and --retry-delay must be >= 0, backoff >= 1")


@dataclass(frozen=True)
class LoadConfig:
    """How hard, how long, and against which servers."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:9000/v1/chat/completions",)
    routing: Routing = "round-robin"
    max_concurrency: int = 64
    request_rate: float = math.inf  # requests/s; inf sends as fast as concurrency allows
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 is Poisson
    arrival: Arrival = "poisson"
    num_requests: int | None = None  # None: each dataset request once
    duration_s: float | None = None
    ramp_up_s: float = 0.0  # the first max_concurrency requests start evenly over this long
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        if self.max_concurrency <= 0:
            raise ValueError("--max-concurrency must be > 0")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf for no limit)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be > 0")
        if self.num_requests is not None and self.num_requests <= 0:
            raise ValueError("--num-requests must be > 0")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("--duration must be > 0")
        if not 0 <= self.ramp_up_s < math.inf:
            raise ValueError("--ramp-up must be >= 0 seconds")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and what the summary contains."""

    results_path: Path = Path("test_results.jsonl")
    summary_path: Path | None = None  # None: <results stem>.summary.json beside the results
    resume: bool = False
    plots: bool = True  # only when matplotlib is importable
    progress: bool = True
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    goodput_slo_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError("percentiles must lie in [0, 100]")
        unknown = set(self.goodput_slo_ms) - set(SLO_METRICS)
        if unknown:
            raise ValueError(f"unknown goodput metric(s) {sorted(unknown)}; use {SLO_METRICS}")

    @property
    def resolved_summary_path(self) -> Path:
        if self.summary_path is not None:
            return self.summary_path
        stem = self.results_path.name.removesuffix(".jsonl")
        return self.results_path.with_name(f"{stem}.summary.json")


@dataclass(frozen=True)
class BenchConfig:
    dataset: DatasetConfig
    request: RequestOptions = field(default_factory=RequestOptions)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    load: LoadConfig = field(default_factory=LoadConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass(frozen=True)
class SweepConfig:
    """``--sweep``: the same workload at several request rates. ``rates`` given: exactly those;
    empty: search upward from ``start_rate`` (times ``factor``) until a rate fails, then bisect
    for the highest passing rate until ``precision``; never more than ``max_runs`` runs."""

    rates: tuple[float, ...] = ()
    start_rate: float = 1.0
    factor: float = 2.0
    max_runs: int = 12
    precision: float = 0.1  # stop bisecting when the failing rate <= passing rate x (1 + this)
    slo_attainment: float = 0.9  # fraction of requests that must meet every --goodput SLO

    def __post_init__(self) -> None:
        if any(not 0 < r < math.inf for r in self.rates):
            raise ValueError("--sweep-rates must be finite rates > 0")
        if not 0 < self.start_rate < math.inf or not self.factor > 1:
            raise ValueError("--sweep-start must be > 0 and --sweep-factor > 1")
        if self.max_runs < 1 or not self.precision > 0:
            raise ValueError("--sweep-max-runs must be >= 1 and --sweep-precision > 0")
        if not 0 < self.slo_attainment <= 1:
            raise ValueError("--slo-attainment must lie in (0, 1]")
