"""Faults against a real server: disconnects free their slot, one failed request leaves the others
intact, SIGTERM drains in-flight requests (or ends them clearly at the deadline) and exits 0."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.integration

FAULTY_USER = "fault-me"
MAX_QUEUE = 6  # room for the concurrent burst of the forced-error test
DRAINED_TOKENS = 1000  # each in-flight request of the drain test: seconds of work, not ms


@pytest.fixture(scope="module")
def faulty(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("faulty"),
        *("--max-num-seqs", "4", "--max-queue", str(MAX_QUEUE)),
        env={"VLSERVE_FAULT_INJECT": f"error:{FAULTY_USER}"},
    )
    yield srv
    stop_server(srv)


def _body(srv: ServerProcess, max_tokens: int, **extra: object) -> dict:
    return {
        "model": srv.model,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        **extra,
    }


def _url(srv: ServerProcess) -> str:
    return srv.base_url + "/v1/chat/completions"


def _health(srv: ServerProcess) -> dict:
    return httpx.get(srv.base_url + "/health", timeout=10).json()


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _stream_events(response: httpx.Response) -> list[dict | str]:
    """The SSE payloads of a whole response: parsed JSON objects and the final "[DONE]"."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _ok_after(srv: ServerProcess) -> None:
    r = httpx.post(_url(srv), json=_body(srv, 3), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# -- disconnects ------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_slot(faulty: ServerProcess) -> None:
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            _url(faulty),
            json=_body(faulty, 10_000, stream=True),
            headers={"x-request-id": "cut-me"},
        ) as r,
    ):
        lines = r.iter_lines()
        for _ in range(6):  # the role chunk and a few tokens: it is decoding now
            next(lines)
        assert _health(faulty)["running"] == 1
    # the client is gone; 10k tokens would take minutes, the abort takes a step
    assert _wait_for(lambda: _health(faulty)["running"] == 0, 10), _health(faulty)
    _ok_after(faulty)
    line = next(x for x in faulty.log_path.read_text().splitlines() if "id=cut-me " in x)
    assert "status=499" in line and "finish_reason=abort" in line, line


def test_disconnect_while_waiting_for_a_whole_completion(faulty: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(_url(faulty), json=_body(faulty, 10_000), timeout=2)
    assert _wait_for(lambda: _health(faulty)["running"] == 0, 10), _health(faulty)
    _ok_after(faulty)


def test_full_queue_is_429_with_retry_after(faulty: ServerProcess) -> None:
    """4 running + MAX_QUEUE waiting fill this server; the next request is told when to retry."""
    body = _body(faulty, 10_000, stream=True)
    with httpx.Client(timeout=60) as client, contextlib.ExitStack() as stack:
        for i in range(4 + MAX_QUEUE):
            response = stack.enter_context(client.stream("POST", _url(faulty), json=body))
            assert response.status_code == 200, i
            # one at a time, each admitted before the next: a burst can find the queue full
            # before the engine has admitted anyone
            want = (min(i + 1, 4), max(i + 1 - 4, 0))
            placed = lambda: tuple(_health(faulty)[k] for k in ("running", "waiting")) == want  # noqa: E731, B023
            assert _wait_for(placed, 30), (want, _health(faulty))
        r = client.post(_url(faulty), json=_body(faulty, 2))
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert _wait_for(lambda: _health(faulty)["running"] == 0, 15), _health(faulty)
    _ok_after(faulty)


# -- one failure, the others intact -----------------------------------------------------------


def _in_threads(*calls: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # surfaced by the assertions below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _post(srv: ServerProcess, body: dict) -> Callable[[], httpx.Response]:
    return lambda: httpx.post(_url(srv), json=body, timeout=120)


def _post_stream(srv: ServerProcess, body: dict) -> Callable[[], list[dict | str]]:
    def call() -> list[dict | str]:
        with httpx.stream("POST", _url(srv), json={**body, "stream": True}, timeout=120) as r:
            assert r.status_code == 200
            return _stream_events(r)

    return call


def test_forced_error_fails_only_its_request(faulty: ServerProcess) -> None:
    good = _body(faulty, 40)
    bad = _body(faulty, 40, user=FAULTY_USER)
    results = _in_threads(
        _post(faulty, good),
        _post(faulty, bad),
        _post_stream(faulty, good),
        _post_stream(faulty, bad),
        _post(faulty, good),
    )
    for i in (0, 4):
        r = results[i]
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["usage"]["completion_tokens"] == 40
    failed = results[1]
    assert isinstance(failed, httpx.Response) and failed.status_code == 500, failed
    error = failed.json()["error"]
    assert error["type"] == "internal_error" and error["code"] == "engine_error"
    assert "injected" not in error["message"]  # internals stay in the log
    streamed_ok = results[2]
    assert isinstance(streamed_ok, list) and streamed_ok[-1] == "[DONE]"
    assert streamed_ok[-2]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    streamed_bad = results[3]
    assert isinstance(streamed_bad, list) and streamed_bad[-1] == "[DONE]", streamed_bad
    assert streamed_bad[-2]["error"]["code"] == "engine_error"  # type: ignore[index]
    _ok_after(faulty)


# -- SIGTERM ----------------------------------------------------------------------------------


def _load_then_sigterm(srv: ServerProcess, max_tokens: int) -> list[object]:
    """Three streaming and three whole requests; SIGTERM once all six are in the engine."""
    body = _body(srv, max_tokens)
    calls = [_post_stream(srv, body) for _ in range(3)] + [_post(srv, body) for _ in range(3)]
    out: list[list[object]] = []
    runner = threading.Thread(target=lambda: out.append(_in_threads(*calls)))
    runner.start()
    busy = lambda: sum(_health(srv)[k] for k in ("running", "waiting")) == 6  # noqa: E731
    assert _wait_for(busy, 60), _health(srv)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Still listening while it drains: newcomers get a clear 503 + Retry-After, not a refusal.
    health = httpx.get(srv.base_url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "draining", health.text
    assert int(health.headers["retry-after"]) >= 1
    late = httpx.post(srv.base_url + "/v1/chat/completions", json=_body(srv, 1), timeout=5)
    assert late.status_code == 503 and late.headers.get("retry-after"), late.text
    assert late.json()["error"]["type"] == "service_unavailable", late.text
    runner.join(180)
    assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
    return out[0]


def test_sigterm_drains_in_flight_requests(tiny_model_path: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model_path, tmp_path, "--shutdown-timeout", "120")
    try:
        # long enough that the drain is still under way when it is probed 0.5 s after SIGTERM
        # (6 x 100 greedy tokens drained within 0.5 s once sampling got faster: the port was
        # already closed)
        results = _load_then_sigterm(srv, DRAINED_TOKENS)
    finally:
        stop_server(srv)
    for events in results[:3]:
        assert isinstance(events, list) and events[-1] == "[DONE]", events
        assert events[-2]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    for r in results[3:]:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["usage"]["completion_tokens"] == DRAINED_TOKENS


def test_sigterm_deadline_ends_requests_clearly(tiny_model_path: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model_path, tmp_path, "--shutdown-timeout", "3")
    started = time.monotonic()
    try:
        results = _load_then_sigterm(srv, 10_000)  # minutes of work: cannot finish in 3 s
    finally:
        stop_server(srv)
    assert time.monotonic() - started < 60
    for events in results[:3]:
        assert isinstance(events, list) and events[-1] == "[DONE]", events
        assert events[-2]["error"]["type"] == "service_unavailable"  # type: ignore[index]
    for r in results[3:]:
        assert isinstance(r, httpx.Response) and r.status_code == 503, r
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "engine_unavailable"


def test_dead_inference_thread_turns_unhealthy_and_exits_nonzero(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    srv = start_server(tiny_model_path, tmp_path, env={"VLSERVE_FAULT_INJECT": "crash:killer"})
    try:
        r = httpx.post(
            srv.base_url + "/v1/chat/completions", timeout=60, json=_body(srv, 4, user="killer")
        )
        assert r.status_code >= 500 and "error" in r.json()
        code = srv.proc.wait(timeout=60)
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)
    assert code == 1
    assert "the inference thread died" in srv.log_path.read_text()


def test_a_stuck_step_is_noticed_and_requests_still_time_out(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """A device call that never returns (the ``hang`` fault): /health turns 503 "stalled" once
    the engine has had work and no finished step for --engine-stall-timeout, new requests get
    503, and the stuck request itself gets its 504 at --request-timeout, from the event loop."""
    srv = start_server(
        tiny_model_path,
        tmp_path,
        *("--engine-stall-timeout", "2", "--request-timeout", "5", "--shutdown-timeout", "2"),
        env={"VLSERVE_FAULT_INJECT": "hang:stuck"},
    )
    try:
        assert _health(srv)["status"] == "ok"
        started = time.monotonic()
        box: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: box.append(httpx.post(_url(srv), json=_body(srv, 4, user="stuck"), timeout=60))
        )
        sender.start()
        assert _wait_for(lambda: _health(srv)["status"] == "stalled", 30), srv.log_tail()
        r = httpx.get(srv.base_url + "/health", timeout=10)
        assert r.status_code == 503 and r.headers["x-vlserve-health"] == "stalled"
        assert r.headers["retry-after"] == "5"
        refused = httpx.post(_url(srv), json=_body(srv, 2), timeout=30)
        assert refused.status_code == 503 and "stalled" in refused.json()["error"]["message"]
        sender.join(60)
        assert box and box[0].status_code == 504, box and box[0].text
        assert box[0].json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 30  # the timeout, not the stuck step, ended it
    finally:
        stop_server(srv)
