"""Issue 22 item 4: prompts too long for the server are refused without holding the
preprocessing thread, and a short request never queues behind long texts being tokenized."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.integration
MILLION = "a" * 1_000_000  # 125,000 tokens of Qwen's vocabulary; at least 7,813 by the bound


@pytest.fixture(scope="module")
def small_kv(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_path, tmp_path_factory.mktemp("small-kv"), "--kv-cache-tokens", "4096")
    yield srv
    stop_server(srv)


def _chat(srv: ServerProcess, content: list[str]) -> httpx.Response:
    messages = [{"role": "user", "content": text} for text in content]
    body = {"model": srv.model, "messages": messages, "max_tokens": 1}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)


def _beside_four_long_prompts(srv: ServerProcess) -> tuple[list[httpx.Response], float]:
    """Four requests of 4 x 1M characters, and a short one sent just after: their answers and
    the short one's latency."""
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        long = [pool.submit(_chat, srv, [MILLION] * 4) for _ in range(4)]
        time.sleep(0.5)  # the long ones are in
        start = time.monotonic()
        short = _chat(srv, ["hi"])
        short_s = time.monotonic() - start
        answers = [f.result() for f in long]
    assert short.status_code == 200, short.text
    return answers, short_s


def test_a_prompt_past_the_bound_is_refused_before_tokenizing(small_kv: ServerProcess) -> None:
    """4,096 KV tokens x 128 bytes a token at most: 4M characters cannot fit, and are refused
    without being tokenized (16 s of tokenizing on one thread before, a short request behind)."""
    answers, short_s = _beside_four_long_prompts(small_kv)
    for r in answers:
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
        assert "at least 31250 tokens" in error["message"] and "--kv-cache-tokens" in error["message"]
        assert error["param"] == "messages"
    assert short_s < 5.0, short_s


def test_a_short_request_does_not_wait_behind_long_texts(server: ServerProcess) -> None:
    """Within the bound (65,536 KV tokens), so each long prompt is tokenized, on the long-text
    lane, until its first million characters pass the limit; the short one goes around."""
    answers, short_s = _beside_four_long_prompts(server)
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least 125000 tokens" in r.json()["error"]["message"], r.text
    assert short_s < 5.0, short_s
