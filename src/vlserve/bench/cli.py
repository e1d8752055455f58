"""`vlserve bench`: flags → BenchConfig → run → results JSONL, summary JSON, table, plots."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from vlserve.bench.config import (
    DEFAULT_PROMPT,
    SLO_METRICS,
    BenchConfig,
    DatasetConfig,
    DatasetKind,
    LoadConfig,
    OutputConfig,
    RequestOptions,
    RetryPolicy,
    normalize_endpoint,
)
from vlserve.bench.sweep_cli import add_sweep_flags, sweep_from_args
from vlserve.bench.video_cli import add_video_flags, video_fields

log = logging.getLogger("vlserve.bench")

DEFAULT_URL = "http://127.0.0.1:9000/v1/chat/completions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    _dataset_flags(parser.add_argument_group("dataset"))
    add_video_flags(parser.add_argument_group("synthetic videos (--dataset random)"))
    _target_flags(parser.add_argument_group("target"))
    _load_flags(parser.add_argument_group("load"))
    _request_flags(parser.add_argument_group("requests"))
    _output_flags(parser.add_argument_group("output"))
    add_sweep_flags(parser.add_argument_group("sweep (capacity planning; docs/BENCH.md, Sweeps)"))


def _dataset_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="GLOB",
        help="JSONL file(s); repeatable, ** allowed",
    )
    data.add_argument(
        "-f", "--file", default=None, metavar="IMAGE", help="one image: send it with --prompt"
    )
    data.add_argument("--prompt", default=DEFAULT_PROMPT, help="question sent with -f IMAGE")
    data.add_argument(
        "--dataset",
        choices=("jsonl", "sample", "random"),
        default=None,
        help="jsonl: --input files; sample: the bundled sample; random: synthetic (default: jsonl, or image with -f)",
    )
    data.add_argument(
        "--base-dir",
        default=None,
        help="directory for relative image paths in JSONL (then the JSONL's folder, then cwd)",
    )
    data.add_argument(
        "--random-input-len",
        type=int,
        default=128,
        help="synthetic: prompt length in tokens (approx.)",
    )
    data.add_argument("--random-images", type=int, default=0, help="synthetic: images per request")
    data.add_argument(
        "--random-image-size",
        action="append",
        default=None,
        metavar="WxH",
        help="synthetic: image size; repeat to cycle sizes (default 448x448)",
    )
    data.add_argument(
        "--random-turns",
        type=int,
        default=1,
        metavar="N",
        help="synthetic: user turns per conversation; later turns carry the earlier ones and the answers",
    )
    data.add_argument(
        "--random-followup-len",
        type=int,
        default=32,
        metavar="N",
        help="synthetic: tokens of each turn after the first (a short new question)",
    )
    data.add_argument(
        "--limit",
        type=int,
        default=0,
        help="use only the first N dataset requests or conversations (0 = all)",
    )
    data.add_argument(
        "--shuffle", action="store_true", help="shuffle the dataset (with --seed) before --limit"
    )
    data.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for shuffling, synthetic data, arrivals and jitter",
    )


def _target_flags(target: argparse._ArgumentGroup) -> None:
    target.add_argument(
        "--url", default=DEFAULT_URL, help="endpoint (host:port, base URL or full URL)"
    )
    target.add_argument(
        "--endpoints", default="", help="comma-separated endpoints; overrides --url"
    )
    target.add_argument(
        "--routing",
        choices=("round-robin", "least-outstanding"),
        default="round-robin",
        help="how --endpoints share requests",
    )
    target.add_argument(
        "--model",
        default=None,
        help="model name (default: the first one the server lists at /v1/models)",
    )
    target.add_argument(
        "--api-key",
        default=None,  # not the env value: --help prints defaults
        help="sent as 'Authorization: Bearer'; $OPENAI_API_KEY when not given",
    )


def _load_flags(load: argparse._ArgumentGroup) -> None:
    load.add_argument(
        "--max-concurrency",
        "--max-concurrent",
        dest="max_concurrency",
        type=int,
        default=0,
        help="requests in flight at most (0 = --npus x --concurrency-per-npu)",
    )
    load.add_argument(
        "--npus",
        type=int,
        default=8,
        help="devices behind the endpoint(s), for the automatic concurrency",
    )
    load.add_argument(
        "--concurrency-per-npu",
        type=int,
        default=8,
        help="requests in flight per device when --max-concurrency is 0",
    )
    load.add_argument(
        "--batch-size", type=int, default=None, help=argparse.SUPPRESS
    )  # prototype flag; ignored
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="open loop: mean arrivals per second (inf = all at once, bounded by concurrency)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more regular",
    )
    load.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="evenly spaced arrivals at this many requests/s (0 = off; the prototype's flag)",
    )
    load.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="send this many requests, cycling the dataset (default: each once; random: 100)",
    )
    load.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep sending (cycling the dataset) for this long",
    )
    load.add_argument(
        "--ramp-up",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="start the first --max-concurrency requests evenly over this long, not all at once",
    )
    load.add_argument(
        "--warmup", type=int, default=0, help="requests sent first and left out of all results"
    )


def _request_flags(req: argparse._ArgumentGroup) -> None:
    req.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream responses (needed for TTFT and ITL)",
    )
    req.add_argument("--max-tokens", type=int, default=256)
    req.add_argument("--temperature", type=float, default=0.0)
    req.add_argument(
        "--ignore-eos", action="store_true", help="ask the server to generate exactly --max-tokens"
    )
    req.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help="JSON object merged into every request, e.g. '{\"top_p\": 0.9}'",
    )
    req.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="per-request timeout in seconds (whole response)",
    )
    req.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries of connection errors, timeouts, 429 and 5xx",
    )
    req.add_argument(
        "--retry-delay",
        type=float,
        default=1.0,
        help="first backoff in seconds (doubles, with jitter); Retry-After wins",
    )


def _output_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--output",
        default="test_results.jsonl",
        help="results JSONL, one line per request as it ends",
    )
    out.add_argument(
        "--summary", default=None, help="summary JSON (default: <output>.summary.json)"
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="append to --output and skip request ids that already succeeded there",
    )
    out.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PNG plots beside the results, when matplotlib is installed",
    )
    out.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress on stderr"
    )
    out.add_argument(
        "--percentiles", default="50,90,99", help="comma-separated percentiles to report"
    )
    out.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="METRIC:MS",
        help=f"SLOs for goodput, metrics {', '.join(SLO_METRICS)}; e.g. ttft:500 e2el:5000",
    )
    out.add_argument(
        "--log-file", default=None, help="also write logs to this file (directories are created)"
    )
    out.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The Namespace stops here: everything below receives this frozen config."""
    kind: DatasetKind = args.dataset or ("image" if args.file else "jsonl")
    sizes = tuple(_parse_size(s) for s in (args.random_image_size or ["448x448"]))
    dataset = DatasetConfig(
        kind=kind,
        inputs=tuple(args.input),
        image_file=args.file,
        prompt=args.prompt,
        base_dir=args.base_dir,
        random_input_len=args.random_input_len,
        random_images=args.random_images,
        random_image_sizes=sizes,
        **video_fields(args, synthetic=kind == "random"),
        random_turns=args.random_turns,
        random_followup_len=args.random_followup_len,
        # the warm-up's own requests come after the timed ones (runner.warmup_requests)
        num_random=(args.num_requests or 100) + args.warmup,
        limit=args.limit,
        shuffle=args.shuffle,
        seed=args.seed,
    )
    request = RequestOptions(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        stream=args.stream,
        extra_body=_parse_extra_body(args.extra_body),
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        timeout_s=args.timeout,
    )
    urls = [u for u in args.endpoints.split(",") if u.strip()] or [args.url]
    concurrency = args.max_concurrency or args.npus * args.concurrency_per_npu
    load = LoadConfig(
        endpoints=tuple(normalize_endpoint(u) for u in urls),
        routing=args.routing,
        max_concurrency=concurrency,
        request_rate=args.rate_limit or args.request_rate,
        burstiness=args.burstiness,
        arrival="constant" if args.rate_limit else "poisson",
        num_requests=_timed_count(args, kind),
        duration_s=args.duration,
        ramp_up_s=args.ramp_up,
        warmup=args.warmup,
        seed=args.seed,
    )
    output = OutputConfig(
        results_path=Path(args.output),
        summary_path=Path(args.summary) if args.summary else None,
        resume=args.resume,
        plots=args.plots,
        progress=args.progress,
        percentiles=tuple(float(p) for p in args.percentiles.split(",") if p.strip()),
        goodput_slo_ms=_parse_goodput(args.goodput or []),
    )
    retry = RetryPolicy(max_retries=args.max_retries, retry_delay_s=args.retry_delay)
    return BenchConfig(dataset=dataset, request=request, retry=retry, load=load, output=output)


def _timed_count(args: argparse.Namespace, kind: str) -> int | None:
    """Requests the timed run sends: ``--num-requests`` (None: the dataset once). A random
    dataset is drawn to size, plus the warm-up's own requests, which the timed run must skip."""
    if kind != "random":
        return args.num_requests
    return (args.num_requests or 100) if args.warmup else None


def _parse_size(text: str) -> tuple[int, int]:
    from vlserve.bench.synthetic import parse_size

    return parse_size(text)


def _parse_extra_body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--extra-body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("--extra-body must be a JSON object")
    return body


def _parse_goodput(items: list[str]) -> dict[str, float]:
    slo: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            slo[name.strip().lower()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--goodput expects METRIC:MS, got {item!r}")
    return slo


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        sweep = sweep_from_args(args)
    except ValueError as exc:
        print(f"vlserve bench: error: {exc}", file=sys.stderr)
        return 2
    from vlserve.bench.app import run_config, setup_logging

    setup_logging(args.log_level, Path(args.log_file) if args.log_file else None)
    if args.batch_size is not None:
        log.warning("--batch-size is ignored: requests are sent as --max-concurrency allows")
    if sweep is not None:
        from vlserve.bench.sweep import run_sweep

        return run_sweep(config, sweep)
    return run_config(config)
