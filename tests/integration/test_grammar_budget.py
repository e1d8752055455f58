"""Grammar compiles never stall other users (issue 22): on a real server with one grammar worker,
a schema past --grammar-compile-timeout is a 400 within it, a json_object request completes
while another user's slow compile runs, and a compile whose client left is killed."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.integration

BUDGET_S = 4.0


def _pattern(n: int) -> dict[str, Any]:
    """A 42-byte schema xgrammar takes about 11 s to compile for n = 150,000 (issue 22)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": f"^.{{0,{n}}}$"}}}
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}


@pytest.fixture(scope="module")
def one_worker(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("grammar"),
        "--grammar-workers", "1",
        "--grammar-compile-timeout", str(BUDGET_S),
    )  # fmt: skip
    try:
        # the first schema sets the compiler up and waits for the worker to start (once)
        quick = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": quick}}
        assert _chat(srv, fmt, timeout=120).status_code == 200
        yield srv
    finally:
        stop_server(srv)


def _chat(srv: ServerProcess, response_format: dict[str, Any], timeout: float) -> httpx.Response:
    body = {
        "model": srv.model,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 8,
        "response_format": response_format,
    }
    return httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=timeout)


def _children(pid: int) -> dict[int, bytes]:
    """Live (not zombie) child processes of ``pid``: their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


def _workers(srv: ServerProcess) -> set[int]:
    """The server's grammar workers: the children of its multiprocessing fork server."""
    servers = [p for p, cmd in _children(srv.proc.pid).items() if b"forkserver" in cmd]
    return {child for server in servers for child in _children(server)}


def test_json_object_is_served_while_a_slow_compile_runs_and_that_is_a_400(
    one_worker: ServerProcess,
) -> None:
    slow: dict[str, Any] = {}

    def send_slow() -> None:
        start = time.monotonic()
        slow["response"] = _chat(one_worker, _pattern(150_000), timeout=60)
        slow["took"] = time.monotonic() - start

    thread = threading.Thread(target=send_slow)
    thread.start()
    time.sleep(1.0)  # the one worker is compiling it
    start = time.monotonic()
    plain = _chat(one_worker, {"type": "json_object"}, timeout=60)
    took = time.monotonic() - start
    assert plain.status_code == 200, plain.text
    assert took < 2.0, took  # the old one grammar thread made it wait for the whole compile
    assert "response" not in slow  # it was still compiling meanwhile
    thread.join(60)
    response = slow["response"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert error["code"] == "grammar_too_complex"
    assert slow["took"] < BUDGET_S + 3.0, slow["took"]  # not the 11 s the compile needs


def test_a_compile_whose_client_left_is_killed_and_its_slot_freed(
    one_worker: ServerProcess,
) -> None:
    (worker,) = _workers(one_worker)
    with pytest.raises(httpx.TimeoutException):  # the client gives up mid-compile and leaves
        _chat(one_worker, _pattern(150_001), timeout=1.0)
    start = time.monotonic()
    while worker in _workers(one_worker) and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert worker not in _workers(one_worker), "the abandoned compile kept running"
    assert time.monotonic() - start < 1.5  # the route polls the connection every 0.25 s
    fresh = {"type": "object", "properties": {"n": {"type": "integer"}}}
    response = _chat(one_worker, {"type": "json_schema", "json_schema": {"name": "f", "schema": fresh}}, timeout=120)
    assert response.status_code == 200, response.text  # a new worker took the slot
    assert len(_workers(one_worker)) == 1
    assert one_worker.proc.poll() is None


def test_a_server_killed_mid_compile_leaves_no_worker_behind(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    srv = start_server(tiny_model_path, tmp_path, "--grammar-compile-timeout", "60")
    try:
        thread = threading.Thread(target=lambda: _catch(lambda: _chat(srv, _pattern(150_003), 60)))
        thread.start()
        start = time.monotonic()
        while not _workers(srv) and time.monotonic() - start < 60:
            time.sleep(0.1)
        workers = _workers(srv)
        assert workers
        time.sleep(1.0)  # one of them is compiling the pattern now
        srv.proc.kill()
        srv.proc.wait()
        start = time.monotonic()
        while any(map(_running, workers)) and time.monotonic() - start < 3:
            time.sleep(0.1)
        left = [pid for pid in workers if _running(pid)]
        assert not left, "grammar workers outlived their server"
        thread.join(10)
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)


def _catch(call: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server was killed under it
        call()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
