"""Summaries: percentiles, rates over successful requests only, output tokens only, goodput."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from vlserve.bench.client import RequestResult, backoff_delay_s, error_message, parse_retry_after
from vlserve.bench.config import RetryPolicy
from vlserve.bench.metrics import (
    NO_USAGE_NOTE,
    distribution_ms,
    endpoint_breakdown,
    percentile,
    summarize,
)


def result(
    ok: bool = True,
    *,
    ttft: float | None = 0.1,
    latency: float = 1.0,
    prompt: int | None = 100,
    completion: int | None = 10,
    chunks: list[float] | None = None,
    endpoint: str = "a",
) -> RequestResult:
    r = RequestResult("r", "r", success=ok, endpoint=endpoint, ttft_s=ttft, latency_s=latency)
    r.prompt_tokens, r.completion_tokens = prompt, completion
    r.chunk_times_s = chunks if chunks is not None else []
    if not ok:
        r.error = "HTTP 500: boom"
    return r


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_distribution_in_ms_with_chosen_percentiles() -> None:
    stats = distribution_ms([0.001 * i for i in range(1, 101)], (50, 99.9))
    assert stats["count"] == 100 and stats["min"] == 1.0 and stats["max"] == 100.0
    assert (
        stats["median"] == 50.5 and stats["p50"] == 50.5 and stats["p99.9"] == pytest.approx(99.901)
    )
    assert distribution_ms([], (50,)) == {"count": 0}


def test_throughput_counts_successful_requests_only() -> None:
    # The prototype divided all requests, failed ones included, by the duration.
    s = summarize([result(), result(), result(False), result(False)], duration_s=2.0)
    assert s["successful"] == 2 and s["failed"] == 2 and s["success_rate"] == 50.0
    assert s["request_throughput"] == 1.0


def test_token_throughput_is_output_tokens_of_successful_requests() -> None:
    # The prototype's tokens/s was total_tokens (prompt included) over the duration.
    s = summarize([result(), result(), result(False)], duration_s=2.0)
    assert s["total_completion_tokens"] == 20 and s["total_prompt_tokens"] == 200
    assert s["output_token_throughput"] == 10.0
    assert s["total_token_throughput"] == 110.0
    assert s["usage_note"] is None


def test_no_usage_is_said_not_guessed() -> None:
    s = summarize([result(prompt=None, completion=None)], duration_s=1.0)
    assert s["output_token_throughput"] is None and s["total_completion_tokens"] is None
    assert s["usage_note"] == NO_USAGE_NOTE
    assert s["tpot_ms"] == {"count": 0}  # TPOT needs the server's token count
    partial = summarize([result(), result(prompt=None, completion=None)], duration_s=1.0)
    assert "only 1 of 2" in partial["usage_note"]


def test_latency_metrics_have_percentiles_and_ttft() -> None:
    # The prototype reported only mean/min/max latency: no percentiles, no TTFT.
    r = result(ttft=0.2, latency=1.1, completion=10, chunks=[0.2 + 0.1 * i for i in range(10)])
    s = summarize([r], duration_s=1.0, percentiles=(50, 90, 99))
    assert s["ttft_ms"]["p99"] == 200.0
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["count"] == 9 and s["itl_ms"]["median"] == pytest.approx(100.0)
    assert s["e2el_ms"]["p90"] == 1100.0


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = result(ttft=0.1, latency=0.5, completion=5)
    slow = result(ttft=0.9, latency=0.5, completion=5)
    unmeasured = result(ttft=None, latency=0.5)
    s = summarize(
        [fast, slow, unmeasured, result(False)], 2.0, goodput_slo_ms={"ttft": 500, "e2el": 1000}
    )
    assert s["goodput"] == {
        "slo_ms": {"ttft": 500, "e2el": 1000},
        "requests": 1,
        "request_throughput": 0.5,
    }


def test_errors_and_retries_are_counted() -> None:
    retried = result()
    retried.retry_count = 2
    s = summarize([retried, result(False), result(False)], 1.0)
    assert s["retries"] == 2 and s["requests_retried"] == 1
    assert s["errors"] == {"HTTP 500: boom": 2}


def test_endpoint_breakdown() -> None:
    rs = [
        result(endpoint="a"),
        result(endpoint="a"),
        result(endpoint="b"),
        result(False, endpoint="b"),
    ]
    b = endpoint_breakdown(rs, 1.0, (50,))
    assert (b["a"]["requests"], b["a"]["successful"], b["b"]["failed"]) == (2, 2, 1)
    assert b["a"]["output_token_throughput"] == 20.0


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(retry_delay_s=1.0, max_delay_s=30.0)
    rng = random.Random(0)
    assert backoff_delay_s(policy, 0, 2.5, rng) == 2.5
    assert backoff_delay_s(policy, 0, 500.0, rng) == 30.0


def test_backoff_grows_exponentially_with_jitter() -> None:
    policy = RetryPolicy(retry_delay_s=1.0, backoff=2.0, max_delay_s=100.0)
    rng = random.Random(0)
    for attempt in range(5):
        delays = {backoff_delay_s(policy, attempt, None, rng) for _ in range(50)}
        assert all(0.5 * 2**attempt <= d <= 1.5 * 2**attempt for d in delays)
        assert len(delays) > 1  # jittered: clients do not retry in lockstep


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= (parse_retry_after(when) or 0) <= 10.5


def test_error_message_shapes() -> None:
    assert error_message('{"error": {"message": "bad image"}}') == "bad image"
    assert error_message('{"detail": "nope"}') == "nope"
    assert error_message("plain text") == "plain text"
