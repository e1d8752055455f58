"""`vlserve bench`: flags → BenchConfig → run → results JSONL, summary JSON, table, plots."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlserve import settings
from vlserve.bench.config import (
    BenchConfig,
    DatasetConfig,
    DatasetKind,
    LoadConfig,
    OutputConfig,
    RequestOptions,
    RetryPolicy,
    normalize_endpoint,
)
from vlserve.bench.flags import DEFAULT_IMAGE_SIZE, DEFAULT_VIDEO_SIZE, BenchFlags
from vlserve.bench.sweep_cli import sweep_from_flags as sweep_from_flags

log = logging.getLogger("vlserve.bench")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + (
        ". Every flag has a VLSERVE_BENCH_* environment variable (the flag wins); "
        "OPENAI_API_KEY gives --api-key."
    )
    settings.add_arguments(parser, BenchFlags)
    # The prototype's flag, accepted and ignored (requests go as --max-concurrency allows).
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)


def build_flags(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> BenchFlags:
    """The flags given, else their variables, else the defaults (ValueError: exit code 2)."""
    return settings.build(BenchFlags, args, os.environ if env is None else env)


def config_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> BenchConfig:
    """The Namespace stops here: everything below receives this frozen config."""
    return config_from_flags(build_flags(args, env))


def config_from_flags(f: BenchFlags) -> BenchConfig:
    kind: DatasetKind = f.dataset or ("image" if f.file else "jsonl")  # type: ignore[assignment]
    dataset = DatasetConfig(
        kind=kind,
        inputs=f.input,
        image_file=f.file,
        prompt=f.prompt,
        base_dir=f.base_dir,
        random_input_len=f.random_input_len,
        random_images=f.random_images,
        random_image_sizes=_sizes(f.random_image_size, DEFAULT_IMAGE_SIZE),
        **video_fields(f, synthetic=kind == "random"),
        random_turns=f.random_turns,
        random_followup_len=f.random_followup_len,
        # the warm-up's own requests come after the timed ones (runner.warmup_requests)
        num_random=(f.num_requests or 100) + f.warmup,
        limit=f.limit,
        shuffle=f.shuffle,
        seed=f.seed,
    )
    request = RequestOptions(
        model=f.model,
        max_tokens=f.max_tokens,
        temperature=f.temperature,
        ignore_eos=f.ignore_eos,
        stream=f.stream,
        extra_body=_parse_extra_body(f.extra_body),
        api_key=f.api_key or None,
        timeout_s=f.timeout,
    )
    urls = [u for u in f.endpoints.split(",") if u.strip()] or [f.url]
    load = LoadConfig(
        endpoints=tuple(normalize_endpoint(u) for u in urls),
        routing=f.routing,  # type: ignore[arg-type]
        max_concurrency=f.max_concurrency or f.npus * f.concurrency_per_npu,
        request_rate=f.rate_limit or f.request_rate,
        burstiness=f.burstiness,
        arrival="constant" if f.rate_limit else "poisson",
        num_requests=_timed_count(f, kind),
        duration_s=f.duration,
        ramp_up_s=f.ramp_up,
        warmup=f.warmup,
        seed=f.seed,
    )
    output = OutputConfig(
        results_path=Path(f.output),
        summary_path=Path(f.summary) if f.summary else None,
        resume=f.resume,
        plots=f.plots,
        progress=f.progress,
        percentiles=_parse_percentiles(f.percentiles),
        goodput_slo_ms=_parse_goodput(f.goodput),
    )
    retry = RetryPolicy(max_retries=f.max_retries, retry_delay_s=f.retry_delay)
    return BenchConfig(dataset=dataset, request=request, retry=retry, load=load, output=output)


def video_fields(f: BenchFlags, synthetic: bool) -> dict[str, Any]:
    """The DatasetConfig fields of the video flags; a ValueError (exit code 2) when synthetic
    videos are asked for and PyAV is not installed."""
    if synthetic and f.random_videos > 0:
        from vlserve.bench.video import VideoSupportMissing, require_av

        try:
            require_av()
        except VideoSupportMissing as exc:
            raise ValueError(f"--random-videos: {exc}") from None
    return {
        "random_videos": f.random_videos,
        "random_video_sizes": _sizes(f.random_video_size, DEFAULT_VIDEO_SIZE),
        "random_video_seconds": f.random_video_seconds,
        "random_video_fps": f.random_video_fps,
    }


def _timed_count(f: BenchFlags, kind: str) -> int | None:
    """Requests the timed run sends: ``--num-requests`` (None: the dataset once). A random
    dataset is drawn to size, plus the warm-up's own requests, which the timed run must skip."""
    if kind != "random":
        return f.num_requests
    return (f.num_requests or 100) if f.warmup else None


def _sizes(given: tuple[str, ...], default: str) -> tuple[tuple[int, int], ...]:
    from vlserve.bench.synthetic import parse_size

    return tuple(parse_size(text) for text in (given or (default,)))


def _parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--percentiles expects P,P,..., got {text!r}") from None


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


def _parse_goodput(items: tuple[str, ...]) -> dict[str, float]:
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
        flags = build_flags(args)
        config = config_from_flags(flags)
        sweep = sweep_from_flags(flags)
    except ValueError as exc:
        print(f"vlserve bench: error: {exc}", file=sys.stderr)
        return 2
    from vlserve.bench.app import run_config, setup_logging

    setup_logging(flags.log_level, Path(flags.log_file) if flags.log_file else None)
    if args.batch_size is not None:
        log.warning("--batch-size is ignored: requests are sent as --max-concurrency allows")
    if sweep is not None:
        from vlserve.bench.sweep import run_sweep

        return run_sweep(config, sweep)
    return run_config(config)
