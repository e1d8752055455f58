"""The bench client against a real local HTTP server with scripted delays and failures."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from vlserve.bench.config import (
    BenchConfig,
    DatasetConfig,
    LoadConfig,
    RequestOptions,
    RetryPolicy,
    normalize_endpoint,
)
from vlserve.bench.dataset import BenchRequest
from vlserve.bench.metrics import NO_USAGE_NOTE, endpoint_breakdown, summarize
from vlserve.bench.runner import RunOutcome, arrival_offsets, run_benchmark
from vlserve.bench.stub import StubProcess

FAST = {"ttft_ms": 5.0, "itl_ms": 0.0}


@pytest.fixture(scope="module")
def stub_server() -> Iterator[StubProcess]:
    with StubProcess(**FAST) as stub:
        yield stub


@pytest.fixture
def stub(stub_server: StubProcess) -> StubProcess:
    stub_server.reset()
    return stub_server


def requests(n: int) -> list[BenchRequest]:
    return [
        BenchRequest(f"q{i}", [{"role": "user", "content": f"hi {i}"}], "test") for i in range(n)
    ]


def run(
    urls: list[str],
    n: int = 1,
    *,
    stream: bool = True,
    max_tokens: int = 8,
    retries: int = 3,
    retry_delay: float = 0.01,
    timeout_s: float = 10.0,
    **load: Any,
) -> RunOutcome:
    config = BenchConfig(
        dataset=DatasetConfig(kind="random"),
        request=RequestOptions(
            model="m", max_tokens=max_tokens, stream=stream, timeout_s=timeout_s
        ),
        retry=RetryPolicy(max_retries=retries, retry_delay_s=retry_delay),
        load=LoadConfig(endpoints=tuple(u + "/v1/chat/completions" for u in urls), **load),
    )
    return asyncio.run(run_benchmark(config, requests(n)))


def test_streaming_ttft_itl_and_tpot_match_the_scripted_delays(stub: StubProcess) -> None:
    stub.config(ttft_ms=150, itl_ms=30)
    # One warm-up request: a fresh connection and a cold stub would add to the first TTFT.
    outcome = run([stub.url], 3, max_tokens=8, max_concurrency=1, warmup=1)
    for r in outcome.results:
        assert r.success, r.error
        assert r.completion_tokens == 8 and r.prompt_tokens == 10 and len(r.chunk_times_s) == 8
        assert r.response == "".join(f"t{i} " for i in range(8))
        assert 0.150 <= r.ttft_s <= 0.150 + 0.15  # type: ignore[operator]
        assert 0.028 <= r.tpot_s <= 0.08  # type: ignore[operator]
        assert r.latency_s >= 0.150 + 7 * 0.030
    # Two chunks can share one read on a busy machine: judge ITL over all 21 gaps.
    assert 0.028 <= statistics.median(x for r in outcome.results for x in r.itl_s) <= 0.08


def test_non_streaming_gets_usage_and_no_ttft(stub: StubProcess) -> None:
    stub.config(ttft_ms=100)
    (r,) = run([stub.url], stream=False, max_tokens=5).results
    assert r.success and r.ttft_s is None and r.tpot_s is None
    assert (r.completion_tokens, r.total_tokens, r.finish_reason) == (5, 15, "length")
    assert r.latency_s >= 0.1 and r.response == "t0 t1 t2 t3 t4 "


def test_a_server_without_usage_is_reported_not_guessed(stub: StubProcess) -> None:
    stub.config(usage=False)
    outcome = run([stub.url], 2)
    assert all(r.success and r.completion_tokens is None for r in outcome.results)
    summary = summarize(outcome.results, outcome.duration_s)
    assert summary["usage_note"] == NO_USAGE_NOTE and summary["output_token_throughput"] is None


def test_no_done_marker_keepalives_and_crlf(stub: StubProcess) -> None:
    stub.config(done=False, keepalive=True, crlf=True)
    (r,) = run([stub.url], max_tokens=6).results
    assert r.success, r.error
    assert len(r.chunk_times_s) == 6 and r.completion_tokens == 6 and r.finish_reason == "length"


def test_error_chunk_fails_without_retry(stub: StubProcess) -> None:
    stub.script("error-chunk")
    (r,) = run([stub.url]).results
    assert not r.success and "scripted error chunk" in (r.error or "")
    assert r.retry_count == 0 and stub.stats()["num_requests"] == 1


def test_client_errors_are_not_retried(stub: StubProcess) -> None:
    stub.script("400")
    (r,) = run([stub.url]).results
    assert not r.success and r.http_status == 400 and r.retry_count == 0
    assert stub.stats()["num_requests"] == 1


def test_429_honours_retry_after(stub: StubProcess) -> None:
    stub.config(retry_after="1")
    stub.script("429")
    (r,) = run([stub.url], retry_delay=0.01).results
    assert r.success and r.retry_count == 1
    first, second = stub.stats()["arrivals"]
    assert second - first >= 0.95  # not the 10 ms backoff


@pytest.mark.parametrize("failure", ["500", "503", "drop", "drop-mid"])
def test_retryable_failures_are_retried(stub: StubProcess, failure: str) -> None:
    stub.config(retry_after="0")
    stub.script(failure, failure)
    (r,) = run([stub.url], retries=3).results
    assert r.success, r.error
    assert r.retry_count == 2 and stub.stats()["num_requests"] == 3
    assert len(r.chunk_times_s) == 8  # the retry's timings, not the dropped attempt's


def test_retries_give_up_after_max_retries(stub: StubProcess) -> None:
    stub.script("500", "500", "500")
    (r,) = run([stub.url], retries=2).results
    assert not r.success and r.retry_count == 2 and r.http_status == 500
    assert r.error == "HTTP 500: scripted 500"


@pytest.mark.parametrize("concurrency", [6, 24])
def test_max_concurrency_is_reached_not_batch_bounded(stub: StubProcess, concurrency: int) -> None:
    # The prototype awaited batches one after another: in flight never exceeded --batch-size.
    stub.config(ttft_ms=300)
    outcome = run([stub.url], 2 * concurrency, max_concurrency=concurrency)
    assert all(r.success for r in outcome.results)
    assert stub.stats()["max_in_flight"] == concurrency == outcome.max_in_flight


def test_poisson_arrivals_follow_the_seeded_schedule(stub: StubProcess) -> None:
    load = LoadConfig(request_rate=40.0, seed=3)
    schedule = list(itertools.islice(arrival_offsets(load, random.Random(3)), 80))
    run([stub.url], 80, request_rate=40.0, seed=3)
    arrivals = stub.stats()["arrivals"]
    measured = [t - arrivals[0] for t in arrivals]
    assert len(measured) == 80
    assert measured[-1] == pytest.approx(schedule[-1], rel=0.1)
    rate = 79 / measured[-1]
    assert 40 * 0.7 <= rate <= 40 * 1.3  # the seeded realisation of a 40/s Poisson process
    assert max(abs(m - s) for m, s in zip(measured, schedule, strict=True)) < 0.2


def test_round_robin_endpoints_are_balanced() -> None:
    with StubProcess(**FAST) as a, StubProcess(**FAST) as b:
        outcome = run([a.url, b.url], 20, max_concurrency=4)
        assert (a.stats()["num_requests"], b.stats()["num_requests"]) == (10, 10)
        breakdown = endpoint_breakdown(outcome.results, outcome.duration_s, (50,))
        assert [v["successful"] for v in breakdown.values()] == [10, 10]


def test_least_outstanding_sends_more_to_the_faster_endpoint() -> None:
    with StubProcess(ttft_ms=300) as slow, StubProcess(ttft_ms=10) as fast:
        run([slow.url, fast.url], 40, max_concurrency=4, routing="least-outstanding")
        assert fast.stats()["num_requests"] > 3 * slow.stats()["num_requests"]


def test_warmup_requests_are_sent_but_not_counted(stub: StubProcess) -> None:
    outcome = run([stub.url], 5, warmup=3)
    assert len(outcome.results) == 5 and stub.stats()["num_requests"] == 8
    assert not any(r.request_id.startswith("warmup") for r in outcome.results)


def test_duration_cycles_the_dataset_until_time_is_up(stub: StubProcess) -> None:
    stub.config(ttft_ms=20)
    outcome = run([stub.url], 3, duration_s=1.0, max_concurrency=4)
    ids = [r.request_id for r in outcome.results]
    assert len(ids) > 10 and len(set(ids)) == len(ids)
    assert 1.0 <= outcome.duration_s < 2.5


def test_model_name_comes_from_v1_models(stub: StubProcess) -> None:
    config = BenchConfig(
        dataset=DatasetConfig(kind="random"),
        load=LoadConfig(endpoints=(normalize_endpoint(stub.url),)),
    )
    outcome = asyncio.run(run_benchmark(config, requests(1)))
    assert outcome.model == "stub-model" and outcome.results[0].success


def test_per_request_timeout_is_retried_then_reported(stub: StubProcess) -> None:
    stub.config(ttft_ms=2000)
    (r,) = run([stub.url], retries=1, timeout_s=0.3).results
    assert not r.success and r.retry_count == 1 and "timeout" in (r.error or "")
    assert 0.3 <= r.latency_s < 1.0


def test_unreachable_endpoint_is_a_connection_error_not_a_crash() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (r,) = run([f"http://127.0.0.1:{port}"], retries=1).results
    assert not r.success and r.retry_count == 1 and (r.error or "").startswith("connection error")


def test_each_request_carries_a_unique_x_request_id(stub: StubProcess) -> None:
    outcome = run([stub.url], 3)
    ids = sorted(r.x_request_id or "" for r in outcome.results)
    tag = ids[0].split("-")[0]
    assert ids == [f"{tag}-q{n}" for n in range(3)]
    assert sorted(stub.stats()["request_ids"]) == ids
