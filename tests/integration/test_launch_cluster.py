"""`vlserve launch`: 2 CPU instances behind a real nginx; traffic survives losing an instance.

Runs twice: with a fake instance (fast; checks the plumbing) and with real `vlserve serve` on the
tiny model (skipped until the server and the tiny model are available).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from vlserve.launch.nginx import find_nginx

pytestmark = pytest.mark.integration
needs_nginx = pytest.mark.skipif(
    find_nginx() is None, reason="nginx is not installed (apt-get install nginx)"
)

FAKE_SERVER = Path(__file__).parents[1] / "unit" / "launch_fake_server.py"
NUM_INSTANCES = 2


@dataclass(frozen=True)
class Launched:
    proc: subprocess.Popen[bytes]
    log_path: Path
    front: str
    ports: tuple[int, ...]
    model: str
    kind: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        """For failure messages: the end of launch's own log."""
        return "launch log (end):\n" + self.log()[-4000:]

    def access_log(self) -> str:
        return (self.log_path.parent / "state" / "nginx" / "access.log").read_text()

    def instance_pids(self, name: str) -> list[int]:
        return [int(pid) for pid in re.findall(rf"{name} started \(pid (\d+)", self.log())]


def free_port_block(count: int) -> int:
    """A first port such that ``count`` consecutive ports are free on loopback."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def real_server_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "vlserve", "serve", "--help"], capture_output=True, timeout=120
    )
    return probe.returncode == 0


@pytest.fixture(params=["fake", "real"])
def launched(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launched]:
    argv = [sys.executable, "-m", "vlserve", "launch", "--device", "cpu"]
    if request.param == "fake":
        model = "fake-model"
        argv += [
            "--serve-command",
            f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))}",
        ]
        ready_timeout_s = 60
    else:
        if not real_server_available():
            pytest.skip("`vlserve serve` is not available yet")
        from vlserve.testing import ensure_tiny_model

        model = str(ensure_tiny_model())
        ready_timeout_s = 300
    base = free_port_block(NUM_INSTANCES + 1)
    argv += ["--model", model, "--num-instances", str(NUM_INSTANCES), "--host", "127.0.0.1"]
    argv += ["--port", str(base), "--state-dir", str(tmp_path / "state")]
    argv += ["--ready-timeout-s", str(ready_timeout_s), "--stop-timeout-s", "20"]
    if request.param == "real":
        argv += ["--", "--dtype", "float32"]
    log_path = tmp_path / "launch.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    ports = tuple(range(base + 1, base + 1 + NUM_INSTANCES))
    launched = Launched(proc, log_path, f"http://127.0.0.1:{base}", ports, model, request.param)
    try:
        wait_for(
            lambda: "ready: 2 instance(s) behind" in launched.log() or proc.poll() is not None,
            ready_timeout_s + 30,
            launched.tail,
        )
        assert proc.poll() is None, f"launch exited early:\n{launched.log()}"
        yield launched
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(
    condition: Callable[[], bool], timeout_s: float, context: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout_s} s\n{context()}")


def chat_body(model: str, stream: bool) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        "max_tokens": 8,
        "temperature": 0.0,
        "stream": stream,
    }


async def one_request(session: aiohttp.ClientSession, url: str, model: str, stream: bool) -> str:
    """Returns "ok" or a description of what went wrong (so a failing test lists them all)."""
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=chat_body(model, stream)
        ) as resp:
            text = await resp.text()
    except aiohttp.ClientError as exc:
        return f"client error: {exc!r}"
    if resp.status != 200:
        return f"HTTP {resp.status}: {text[:200]}"
    if not stream:
        message = json.loads(text)["choices"][0]["message"]
        return "ok" if message["role"] == "assistant" else f"bad body: {text[:200]}"
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if len(events) < 2 or events[-1] != "[DONE]":
        return f"bad stream: {text[:200]}"
    for event in events[:-1]:
        json.loads(event)
    return "ok"


def burst(url: str, model: str, num_requests: int) -> list[str]:
    async def run() -> list[str]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            jobs = [
                one_request(session, url, model, stream=i % 2 == 1) for i in range(num_requests)
            ]
            return await asyncio.gather(*jobs)

    return asyncio.run(run())


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def launch_series(text: str) -> dict[str, float]:
    """The launcher's text: ``name{labels}`` → value."""
    pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key: float(value) for key, value in pairs}


def check_metrics_paths(launched: Launched) -> None:
    """Each instance has its own scrape path through nginx; /metrics is launch's own series."""
    for index, port in enumerate(launched.ports):
        path = f"{launched.front}/instances/{index}/metrics"
        if launched.kind == "fake":  # the fake answers every GET with its pid
            (pid,) = [json.loads(http_get(f"http://127.0.0.1:{port}/health"))["pid"]]
            assert json.loads(http_get(path))["pid"] == pid
            continue
        # Every scrape of one instance counts itself there (after answering): 0, 1, 2, 3, 4,
        # never 1, 3, 1, 3 as through the balancer.
        key = 'vlserve_requests_total{route="/metrics",status="200"} '
        counts = [
            next((float(x.split()[-1]) for x in http_get(path).splitlines() if x.startswith(key)), 0)
            for _ in range(5)
        ]
        assert counts == sorted(counts) and counts[-1] >= counts[0] + 3, counts
    restarted = 'vlserve_launch_restarts_total{process="instance-1"}'

    def settled() -> bool:  # the file is rewritten every health interval
        series = launch_series(http_get(f"{launched.front}/metrics"))
        return series.get(restarted) == 1 and series["vlserve_launch_instances_ready"] == 2

    wait_for(settled, 30, lambda: http_get(f"{launched.front}/metrics"))
    series = launch_series(http_get(f"{launched.front}/metrics"))
    assert series["vlserve_launch_instances"] == NUM_INSTANCES
    assert series['vlserve_launch_restarts_total{process="instance-0"}'] == 0
    assert series['vlserve_launch_hangs_total{process="instance-1"}'] == 0  # a crash, not a hang


def health_ok(url: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).split()[1:2] == [b"200"]
    except OSError:
        return False


async def stream_across_sigterm(launched: Launched) -> str:
    """Start a long stream, SIGTERM launch once it is flowing, return the rest of the stream."""
    body = chat_body(launched.model, stream=True)
    # Fake: 40 chunks 50 ms apart; real: 48 forced tokens on a CPU shared by two instances.
    body.update({"max_tokens": 40, "delay_s": 0.05} if launched.kind == "fake" else
                {"max_tokens": 48, "ignore_eos": True})  # fmt: skip
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(f"{launched.front}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: "), first
        launched.proc.send_signal(signal.SIGTERM)
        return (await resp.read()).decode()


def bench_instances_directly(launched: Launched) -> None:
    """`vlserve bench --endpoints` still works against the instances, bypassing nginx."""
    endpoints = ",".join(f"http://127.0.0.1:{port}/v1" for port in launched.ports)
    output = launched.log_path.parent / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "vlserve", "bench", "--endpoints", endpoints, "--dataset", "random",
         "--num-requests", "4", "--max-tokens", "4", "--no-plots", "--no-progress",
         "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["success"] for row in rows] == [True] * 4, rows
    assert {row["endpoint"].split("/v1")[0] for row in rows} == {
        f"http://127.0.0.1:{port}" for port in launched.ports
    }


@needs_nginx
def test_traffic_through_nginx_survives_losing_an_instance(launched: Launched) -> None:
    results = burst(launched.front, launched.model, 8)
    assert results == ["ok"] * 8, (results, launched.tail())
    # least_conn spread 8 concurrent requests over both instances.
    # nginx writes a log line just after the response is sent: it may trail the client a little.
    wait_for(
        lambda: launched.access_log().count("POST /v1/chat/completions") == 8,
        10,
        launched.access_log,
    )
    access_log = launched.access_log()
    for port in launched.ports:
        assert f"upstream=127.0.0.1:{port}" in access_log

    (victim_pid,) = launched.instance_pids("instance-1")
    os.kill(victim_pid, signal.SIGKILL)
    wait_for(lambda: "instance-1 exited with code -9" in launched.log(), 30, launched.tail)
    results = burst(launched.front, launched.model, 8)
    assert results == ["ok"] * 8, (results, launched.tail())

    # The supervisor brings it back on the same port.
    wait_for(lambda: len(launched.instance_pids("instance-1")) == 2, 60, launched.tail)
    wait_for(lambda: health_ok(f"http://127.0.0.1:{launched.ports[1]}"), 300, launched.tail)
    results = burst(launched.front, launched.model, 8)
    assert results == ["ok"] * 8, (results, launched.tail())
    check_metrics_paths(launched)

    if launched.kind == "real":
        bench_instances_directly(launched)

    # SIGTERM drains: a stream already running through nginx still completes.
    tail = asyncio.run(stream_across_sigterm(launched))
    assert tail.rstrip().endswith("data: [DONE]"), tail
    assert launched.proc.wait(timeout=90) == 0, launched.tail()
    for port in launched.ports:
        assert not health_ok(f"http://127.0.0.1:{port}")
    assert "nginx stopped (exit code 0)" in launched.log()


def test_launch_gives_up_on_an_instance_that_never_starts(tmp_path: Path) -> None:
    base = free_port_block(2)
    serve = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))} --exit-code 3"
    result = subprocess.run(
        [sys.executable, "-m", "vlserve", "launch", "--model", "m", "--device", "cpu",
         "--port", str(base), "--host", "127.0.0.1", "--nginx", "off", "--serve-command", serve,
         "--max-startup-failures", "2", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    # The reason, with the instance's own last words, is in launch's output.
    assert "2 times in a row before becoming ready; giving up" in result.stderr
    assert "fake server exiting with 3" in result.stderr
    assert (tmp_path / "state" / "nginx" / "vlserve-upstream.conf").exists()
