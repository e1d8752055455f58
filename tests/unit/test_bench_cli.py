"""`vlserve bench` flags → BenchConfig, and a base install that imports no server stack."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vlserve.bench import cli
from vlserve.bench.config import BenchConfig


def config(*argv: str) -> BenchConfig:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.config_from_args(parser.parse_args(list(argv)))


def test_defaults_follow_the_prototype() -> None:
    c = config("--input", "x.jsonl")
    assert c.load.endpoints == ("http://127.0.0.1:9000/v1/chat/completions",)
    assert c.load.max_concurrency == 64  # --npus 8 x --concurrency-per-npu 8
    assert (c.request.max_tokens, c.request.temperature, c.request.timeout_s) == (256, 0.0, 300.0)
    assert c.request.stream and c.retry.max_retries == 3 and c.retry.retry_delay_s == 1.0
    assert math.isinf(c.load.request_rate) and c.output.results_path == Path("test_results.jsonl")
    assert c.output.resolved_summary_path == Path("test_results.summary.json")


def test_concurrency_flags() -> None:
    assert (
        config("--input", "x", "--npus", "2", "--concurrency-per-npu", "3").load.max_concurrency
        == 6
    )
    assert config("--input", "x", "--max-concurrent", "5").load.max_concurrency == 5
    assert (
        config("--input", "x", "--max-concurrency", "7", "--batch-size", "2").load.max_concurrency
        == 7
    )


def test_endpoints_are_normalized_and_override_url() -> None:
    c = config(
        "--input",
        "x",
        "--url",
        "ignored:1",
        "--endpoints",
        "h1:9000, http://h2:9001/v1,https://h3/v1/chat/completions",
    )
    assert c.load.endpoints == (
        "http://h1:9000/v1/chat/completions",
        "http://h2:9001/v1/chat/completions",
        "https://h3/v1/chat/completions",
    )


def test_rates_and_request_options() -> None:
    c = config("--input", "x", "--rate-limit", "5")
    assert (c.load.request_rate, c.load.arrival) == (5.0, "constant")
    c = config(
        "--input",
        "x",
        "--request-rate",
        "3",
        "--burstiness",
        "0.5",
        "--no-stream",
        "--ignore-eos",
        "--extra-body",
        '{"top_p": 0.9}',
        "--goodput",
        "ttft:500",
        "e2el:3000",
        "--percentiles",
        "50,99.9",
    )
    assert (c.load.request_rate, c.load.burstiness, c.load.arrival) == (3.0, 0.5, "poisson")
    assert not c.request.stream and c.request.ignore_eos and c.request.extra_body == {"top_p": 0.9}
    assert c.output.goodput_slo_ms == {"ttft": 500.0, "e2el": 3000.0}
    assert c.output.percentiles == (50.0, 99.9)


def test_dataset_kinds() -> None:
    assert config("-f", "img.png").dataset.kind == "image"
    assert config("--dataset", "sample").dataset.kind == "sample"
    c = config("--dataset", "random", "--num-requests", "7", "--random-image-size", "64x32")
    assert (c.dataset.kind, c.dataset.num_random, c.load.num_requests) == ("random", 7, None)
    assert c.dataset.random_image_sizes == ((64, 32),)
    # a warm-up draws requests of its own, after the timed ones (runner.warmup_requests)
    c = config("--dataset", "random", "--num-requests", "7", "--warmup", "3")
    assert (c.dataset.num_random, c.load.num_requests, c.load.warmup) == (10, 7, 3)


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no data at all
        ["--input", "x", "--max-tokens", "0"],
        ["--input", "x", "--goodput", "ttft"],
        ["--input", "x", "--goodput", "latency:5"],
        ["--input", "x", "--extra-body", "[1]"],
        ["--input", "x", "--request-rate", "0"],
        ["--dataset", "random", "--random-image-size", "big"],
    ],
)
def test_bad_flags_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(argv)) == 2
    assert "vlserve bench: error:" in capsys.readouterr().err


def test_no_data_exits_1_like_the_prototype(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path / "r.jsonl")]
    )
    assert cli.run(args) == 1


HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "pydantic", "PIL", "numpy", "httpx", "av")


def test_bench_imports_no_server_stack() -> None:
    code = f"""
import json, sys
import vlserve.bench, vlserve.bench.cli, vlserve.bench.app, vlserve.bench.stub
from vlserve.cli import build_parser
build_parser(["bench"]).parse_args(["bench", "--dataset", "sample"])
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_api_key_comes_from_the_env_and_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlserve.bench.app import build_summary
    from vlserve.bench.client import request_headers
    from vlserve.bench.runner import RunOutcome

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    c = config("--input", "x")
    assert request_headers(c.request)["Authorization"] == "Bearer sk-secret"
    assert config("--input", "x", "--api-key", "other").request.api_key == "other"
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert "sk-secret" not in parser.format_help()
    summary = build_summary(c, RunOutcome(), dataset_size=0, skipped_lines=0, resumed=0)
    assert "sk-secret" not in json.dumps(summary)


def test_every_flag_has_a_bench_variable_and_the_flag_wins() -> None:
    """bench's flags are declared once (bench/flags.py), with their own prefix: a server's
    VLSERVE_MODEL (a checkpoint path) or VLSERVE_PORT beside it must not change the bench."""
    from vlserve import settings
    from vlserve.bench.flags import BenchFlags

    names = settings.env_names(BenchFlags)
    assert all(name.startswith("VLSERVE_BENCH_") for name in names)
    assert "VLSERVE_BENCH_MAX_CONCURRENCY" in names and "VLSERVE_BENCH_SWEEP_RATES" in names
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    env = {"VLSERVE_BENCH_INPUT": "a.jsonl,b.jsonl", "VLSERVE_BENCH_MAX_CONCURRENCY": "5",
           "VLSERVE_BENCH_STREAM": "false", "VLSERVE_BENCH_REQUEST_RATE": "inf",
           "VLSERVE_BENCH_GOODPUT": "ttft:200,e2el:900", "VLSERVE_MODEL": "/models/x",
           "OPENAI_API_KEY": "sk-env"}  # fmt: skip
    c = cli.config_from_args(parser.parse_args([]), env)
    assert c.dataset.inputs == ("a.jsonl", "b.jsonl") and c.load.max_concurrency == 5
    assert not c.request.stream and math.isinf(c.load.request_rate)
    assert c.output.goodput_slo_ms == {"ttft": 200.0, "e2el": 900.0}
    assert c.request.model is None and c.request.api_key == "sk-env"
    c = cli.config_from_args(parser.parse_args(["--max-concurrent", "7", "--stream"]), env)
    assert c.load.max_concurrency == 7 and c.request.stream
    with pytest.raises(ValueError, match="VLSERVE_BENCH_MAX_TOKENS='many'"):
        cli.config_from_args(parser.parse_args([]), {"VLSERVE_BENCH_MAX_TOKENS": "many"})
    with pytest.raises(ValueError, match="--max-tokens / max_tokens must be an integer >= 1"):
        cli.config_from_args(parser.parse_args(["--max-tokens", "0"]), {})
