"""`vlserve bench`'s flags, declared once (vlserve.settings): each is a field with its help and
bounds; the flags, the ``VLSERVE_BENCH_*`` variables and the checks are made from it.
``bench/cli.py`` turns a built :class:`BenchFlags` into the frozen BenchConfig the run uses.

The variables have their own prefix: bench often runs beside a server whose ``VLSERVE_MODEL``
(a checkpoint path) or ``VLSERVE_PORT`` mean something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from vlserve import settings
from vlserve.bench.config import DEFAULT_PROMPT, SLO_METRICS
from vlserve.settings import option

DEFAULT_URL = "http://127.0.0.1:9000/v1/chat/completions"
DEFAULT_IMAGE_SIZE = "448x448"
DEFAULT_VIDEO_SIZE = "320x240"

_DATA = "dataset"
_VIDEO = "synthetic videos (--dataset random)"
_TARGET = "target"
_LOAD = "load"
_REQ = "requests"
_OUT = "output"
_SWEEP = "sweep (capacity planning; docs/BENCH.md, Sweeps)"
_S = "SECONDS"


@dataclass(frozen=True)
class BenchFlags:
    """Every `vlserve bench` flag, as the user gives it."""

    ENV_PREFIX: ClassVar[str] = "VLSERVE_BENCH_"

    # dataset
    input: tuple[str, ...] = option(
        (), group=_DATA, repeat=True, metavar="GLOB", help="JSONL file(s); repeatable, ** allowed"
    )
    file: str | None = option(
        None, group=_DATA, aliases=("-f",), metavar="IMAGE",
        help="one image: send it with --prompt",
    )  # fmt: skip
    prompt: str = option(DEFAULT_PROMPT, group=_DATA, help="question sent with -f IMAGE")
    dataset: str | None = option(
        None, group=_DATA, choices=("jsonl", "sample", "random"),
        help="jsonl: --input files; sample: the bundled sample; random: synthetic",
        doc_default="jsonl, or image with -f",
    )  # fmt: skip
    base_dir: str | None = option(
        None, group=_DATA, metavar="DIR",
        help="directory for relative image paths in JSONL (then the JSONL's folder, then cwd)",
    )  # fmt: skip
    random_input_len: int = option(
        128, group=_DATA, min=1, metavar="N", help="synthetic: prompt length in tokens (approx.)"
    )
    random_images: int = option(
        0, group=_DATA, min=0, metavar="N", help="synthetic: images per request"
    )
    random_image_size: tuple[str, ...] = option(
        (), group=_DATA, repeat=True, metavar="WxH", doc_default=DEFAULT_IMAGE_SIZE,
        help="synthetic: image size; repeat to cycle sizes",
    )  # fmt: skip
    random_turns: int = option(
        1, group=_DATA, min=1, metavar="N",
        help="synthetic: user turns per conversation; later turns carry the earlier ones and "
        "the answers",
    )  # fmt: skip
    random_followup_len: int = option(
        32, group=_DATA, min=1, metavar="N",
        help="synthetic: tokens of each turn after the first (a short new question)",
    )  # fmt: skip
    limit: int = option(
        0, group=_DATA, min=0, metavar="N",
        help="use only the first N dataset requests or conversations (0 = all)",
    )  # fmt: skip
    shuffle: bool = option(
        False, group=_DATA, help="shuffle the dataset (with --seed) before --limit"
    )
    seed: int = option(0, group=_DATA, help="seed for shuffling, synthetic data, arrivals, jitter")

    # synthetic videos
    random_videos: int = option(
        0, group=_VIDEO, min=0, metavar="N",
        help="synthetic: videos per request (MP4/H.264, each one different; needs the video "
        "extra: pip install 'vlserve[video]')",
    )  # fmt: skip
    random_video_size: tuple[str, ...] = option(
        (), group=_VIDEO, repeat=True, metavar="WxH", doc_default=DEFAULT_VIDEO_SIZE,
        help="synthetic: video size, even; repeat to cycle sizes",
    )  # fmt: skip
    random_video_seconds: float = option(
        4.0, group=_VIDEO, above=0, metavar="S", help="synthetic: video duration in seconds"
    )
    random_video_fps: float = option(
        30.0, group=_VIDEO, above=0, metavar="F",
        help="synthetic: video frame rate (the server samples its own frames from it)",
    )  # fmt: skip

    # target
    url: str = option(DEFAULT_URL, group=_TARGET, help="endpoint (host:port, base URL or full URL)")
    endpoints: str = option(
        "", group=_TARGET, metavar="URL,URL,...", help="comma-separated endpoints; overrides --url"
    )
    routing: str = option(
        "round-robin", group=_TARGET, choices=("round-robin", "least-outstanding"),
        help="how --endpoints share requests",
    )  # fmt: skip
    model: str | None = option(
        None, group=_TARGET, help="model name",
        doc_default="the first one the server lists at /v1/models",
    )  # fmt: skip
    api_key: str | None = option(
        None, group=_TARGET, secret=True, env_aliases=("OPENAI_API_KEY",),
        help="sent as 'Authorization: Bearer'",
    )  # fmt: skip

    # load
    max_concurrency: int = option(
        0, group=_LOAD, min=0, aliases=("--max-concurrent",), metavar="N",
        help="requests in flight at most (0 = --npus x --concurrency-per-npu)",
    )  # fmt: skip
    npus: int = option(
        8, group=_LOAD, min=1, metavar="N",
        help="devices behind the endpoint(s), for the automatic concurrency",
    )  # fmt: skip
    concurrency_per_npu: int = option(
        8, group=_LOAD, min=1, metavar="N",
        help="requests in flight per device when --max-concurrency is 0",
    )  # fmt: skip
    request_rate: float = option(
        math.inf, group=_LOAD, above=0, infinite=True, metavar="RATE",
        help="open loop: mean arrivals per second (inf = all at once, bounded by concurrency)",
    )  # fmt: skip
    burstiness: float = option(
        1.0, group=_LOAD, above=0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more regular",
    )  # fmt: skip
    rate_limit: float = option(
        0.0, group=_LOAD, min=0, metavar="RATE",
        help="evenly spaced arrivals at this many requests/s (0 = off; the prototype's flag)",
    )  # fmt: skip
    num_requests: int | None = option(
        None, group=_LOAD, min=1, metavar="N",
        help="send this many requests, cycling the dataset",
        doc_default="each once; random: 100",
    )  # fmt: skip
    duration: float | None = option(
        None, group=_LOAD, above=0, metavar=_S, help="keep sending (cycling the dataset) this long"
    )
    ramp_up: float = option(
        0.0, group=_LOAD, min=0, metavar=_S,
        help="start the first --max-concurrency requests evenly over this long, not all at once",
    )  # fmt: skip
    warmup: int = option(
        0, group=_LOAD, min=0, metavar="N", help="requests sent first and left out of all results"
    )

    # requests
    stream: bool = option(True, group=_REQ, help="stream responses (needed for TTFT and ITL)")
    max_tokens: int = option(256, group=_REQ, min=1, metavar="N", help="max_tokens of each request")
    temperature: float = option(0.0, group=_REQ, min=0, help="temperature of each request")
    ignore_eos: bool = option(
        False, group=_REQ, help="ask the server to generate exactly --max-tokens"
    )
    extra_body: str | None = option(
        None, group=_REQ, metavar="JSON",
        help="JSON object merged into every request, e.g. '{\"top_p\": 0.9}'",
    )  # fmt: skip
    timeout: float = option(
        300.0, group=_REQ, above=0, metavar=_S, help="per-request timeout (whole response)"
    )
    max_retries: int = option(
        3, group=_REQ, min=0, metavar="N", help="retries of connection errors, timeouts, 429, 5xx"
    )
    retry_delay: float = option(
        1.0, group=_REQ, min=0, metavar=_S,
        help="first backoff (doubles, with jitter); Retry-After wins",
    )  # fmt: skip

    # output
    output: str = option(
        "test_results.jsonl", group=_OUT, metavar="PATH",
        help="results JSONL, one line per request as it ends",
    )  # fmt: skip
    summary: str | None = option(
        None, group=_OUT, metavar="PATH", help="summary JSON", doc_default="<output>.summary.json"
    )
    resume: bool = option(
        False, group=_OUT,
        help="append to --output and skip request ids that already succeeded there",
    )  # fmt: skip
    plots: bool = option(
        True, group=_OUT, help="PNG plots beside the results, when matplotlib is installed"
    )
    progress: bool = option(True, group=_OUT, help="progress on stderr")
    percentiles: str = option(
        "50,90,99", group=_OUT, metavar="P,P,...", help="comma-separated percentiles to report"
    )
    goodput: tuple[str, ...] = option(
        (), group=_OUT, metavar="METRIC:MS",
        help=f"SLOs for goodput, metrics {', '.join(SLO_METRICS)}; e.g. ttft:500 e2el:5000",
    )  # fmt: skip
    log_file: str | None = option(
        None, group=_OUT, metavar="PATH",
        help="also write logs to this file (directories are created)",
    )  # fmt: skip
    log_level: str = option(
        "INFO", group=_OUT, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level"
    )

    # sweep
    sweep: bool = option(
        False, group=_SWEEP,
        help="run the workload at a series of request rates: --sweep-rates, else a search",
    )  # fmt: skip
    sweep_rates: str | None = option(
        None, group=_SWEEP, metavar="R1,R2,...", help="these rates (implies --sweep)"
    )
    sweep_start: float = option(
        1.0, group=_SWEEP, above=0, metavar="RATE", help="search: the first rate (req/s)"
    )
    sweep_factor: float = option(
        2.0, group=_SWEEP, above=1, help="search: rate multiplier until a rate fails"
    )
    sweep_max_runs: int = option(
        12, group=_SWEEP, min=1, metavar="N", help="search: at most this many rates"
    )
    sweep_precision: float = option(
        0.1, group=_SWEEP, above=0, help="search: bisect until failing <= passing x (1+P)"
    )
    slo_attainment: float = option(
        0.9, group=_SWEEP, above=0, max=1,
        help="share of requests that must meet every --goodput SLO",
    )  # fmt: skip

    def __post_init__(self) -> None:
        settings.check(self)
