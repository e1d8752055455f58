"""A real server under load: every series of docs/METRICS.md's vLLM map moves, while the load
runs (gauges) or by its end (counters and histograms), and tokens are counted as they come."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.integration

# Few rows and a small KV cache: requests queue (waiting > 0), and sequences growing by 120
# tokens each outgrow 256 KV tokens three at a time (preemptions).
FLAGS = ("--max-num-seqs", "3", "--kv-cache-tokens", "256")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "red")


@pytest.fixture(scope="module")
def busy(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = start_server(tiny_model_path, tmp_path_factory.mktemp("metrics"), *FLAGS)
    yield srv
    stop_server(srv)


def scrape(srv: ServerProcess) -> dict[str, float]:
    """Sample name → value, summed over labels (the model's series have one model_name)."""
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name", srv.model) != srv.model:
                raise AssertionError(f"unexpected model_name: {sample}")
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def body(srv: ServerProcess, words: int, max_tokens: int, offset: int = 0) -> dict:
    text = " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(words))
    return {
        "model": srv.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def load_and_watch(srv: ServerProcess) -> tuple[list[dict[str, float]], list[int]]:
    """Eight concurrent streamed requests (each its own prompt), scraping /metrics meanwhile."""
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:

        async def one(i: int) -> int:
            async with client.stream(
                "POST", "/v1/chat/completions", json=body(srv, 30, 120, offset=i)
            ) as resp:
                async for _ in resp.aiter_lines():
                    pass
                return resp.status_code

        requests = asyncio.gather(*(one(i) for i in range(8)))
        scrapes = []
        while not requests.done():
            scrapes.append(await asyncio.to_thread(scrape, srv))
            await asyncio.sleep(0.05)
        return scrapes, await requests


def test_every_listed_series_moves_under_load(busy: ServerProcess) -> None:
    before = scrape(busy)
    # the same prompt twice: the second finds the first's blocks in the prefix cache
    for _ in range(2):
        repeat = {**body(busy, 40, 2), "stream": False}
        r = httpx.post(busy.base_url + "/v1/chat/completions", json=repeat, timeout=60)
        assert r.status_code == 200, r.text
    scrapes, statuses = asyncio.run(load_and_watch(busy))
    assert statuses == [200] * 8
    after = scrape(busy)

    grew = {
        "vlserve_prompt_tokens_total",
        "vlserve_completion_tokens_total",
        "vlserve_prefix_cache_query_tokens_total",
        "vlserve_prefix_cache_hit_tokens_total",
        "vlserve_preemptions_total",
        "vlserve_request_finish_total",
        "vlserve_time_to_first_token_seconds_count",
        "vlserve_time_per_output_token_seconds_count",
        "vlserve_e2e_request_latency_seconds_count",
        "vlserve_queue_time_seconds_count",
        "vlserve_step_tokens_count",
        "vlserve_batch_size_count",
    }
    still = {name for name in grew if not after.get(name, 0.0) > before.get(name, 0.0)}
    assert not still, {name: (before.get(name), after.get(name)) for name in still}
    assert after["vlserve_completion_tokens_total"] - before["vlserve_completion_tokens_total"] == (
        8 * 120 + 2 * 2
    )
    # each choice's gaps: (tokens - 1) per request
    tpot = "vlserve_time_per_output_token_seconds_count"
    assert after[tpot] - before[tpot] == 8 * 119 + 2 * 1

    for gauge in (
        "vlserve_num_requests_running",
        "vlserve_num_requests_waiting",
        "vlserve_kv_cache_usage_ratio",
        "vlserve_engine_stalled_seconds",
    ):
        assert max(s[gauge] for s in scrapes) > 0, (gauge, len(scrapes))
    # tokens are counted while requests run, not only when they end
    tokens = "vlserve_completion_tokens_total"
    assert any(
        before[tokens] < s[tokens] < after[tokens] and s["vlserve_num_requests_running"] > 0
        for s in scrapes
    ), [s[tokens] for s in scrapes]
    assert after["vlserve_num_requests_running"] == after["vlserve_num_requests_waiting"] == 0
