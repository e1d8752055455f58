"""Hung instances: the counting rule, its place in the supervisor, and a real SIGSTOPped server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vlserve.launch.health import HungDetector, is_stopped, probe_status
from vlserve.launch.supervisor import ChildState, ProcessSpec, RestartPolicy, Supervisor
from vlserve.testing.server import free_port

FAKE_SERVER = Path(__file__).with_name("launch_fake_server.py")
# Probes every 50 ms, 0.5 s without an answer fails one, 3 failed in a row is a hang.
FAST = RestartPolicy(
    initial_backoff_s=0.2,
    max_backoff_s=1.0,
    stable_after_s=60.0,
    max_startup_failures=2,
    health_interval_s=0.05,
    health_timeout_s=0.5,
    hung_after=3,
    hung_kill_grace_s=2.0,
    stop_timeout_s=5.0,
)


def fake_spec(tmp_path: Path, name: str, *extra: str) -> ProcessSpec:
    port = free_port()
    return ProcessSpec(
        name=name,
        argv=(sys.executable, str(FAKE_SERVER), "--port", str(port), *extra),
        env=dict(os.environ),
        log_path=tmp_path / f"{name}.log",
        health_url=f"http://127.0.0.1:{port}/health",
    )


def sleeper_spec(tmp_path: Path, name: str = "s", **kwargs: object) -> ProcessSpec:
    """A real process whose health is whatever a scripted probe says."""
    return ProcessSpec(
        name=name,
        argv=(sys.executable, "-c", "import time; time.sleep(120)"),
        env=dict(os.environ),
        log_path=tmp_path / f"{name}.log",
        health_url="http://scripted/health",
        **kwargs,  # type: ignore[arg-type]
    )


class ScriptedProbe:
    """Answers from ``script`` one probe at a time, then ``then`` forever; counts the probes."""

    def __init__(self, script: list[int | None], then: int | None = 200) -> None:
        self.script = deque(script)
        self.then = then
        self.calls = 0

    async def __call__(self, url: str, timeout_s: float) -> int | None:
        self.calls += 1
        return self.script.popleft() if self.script else self.then


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s} s")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


# -- the rule ---------------------------------------------------------------------------------


def test_detector_counts_only_consecutive_unanswered_checks() -> None:
    detector = HungDetector(3)
    # A 503 (draining, over the connection limit) or a 500 is an answer: the server is alive.
    outcomes = [detector.record(s) for s in (None, None, 503, None, None, 500, None, None)]
    assert outcomes == [False] * 8
    assert detector.failures_in_a_row == 2
    assert detector.record(None) is True
    assert detector.record(200) is False and detector.failures_in_a_row == 0


def test_detector_zero_is_off_and_negative_is_refused() -> None:
    detector = HungDetector(0)
    assert not any(detector.record(None) for _ in range(100))
    with pytest.raises(ValueError):
        HungDetector(-1)


@pytest.mark.parametrize(
    "overrides",
    [{"health_interval_s": 0}, {"health_timeout_s": -1}, {"hung_after": -1},
     {"hung_kill_grace_s": 0}],
)  # fmt: skip
def test_restart_policy_validates_the_hang_settings(overrides: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**overrides)  # type: ignore[arg-type]


def test_probe_status_reports_any_answer_and_none_for_silence(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = Supervisor(FAST)
        spec = fake_spec(tmp_path, "a", "--ready-after-s", "60")
        sup.start(spec)
        url = spec.health_url or ""
        await until(lambda: sup.pid("a") is not None)
        while await probe_status(url, 1.0) is None:  # until it listens
            await asyncio.sleep(0.05)
        assert await probe_status(url, 1.0) == 503  # loading: an answer
        pid = sup.pid("a") or 0
        assert not is_stopped(pid)
        os.kill(pid, signal.SIGSTOP)
        await until(lambda: is_stopped(pid), timeout_s=5)  # delivered asynchronously
        assert await probe_status(url, 0.3) is None  # connected by the kernel, never answered
        # An orderly stop continues a stopped child so that its SIGTERM is handled at once.
        await asyncio.wait_for(sup.stop(), timeout=3)

    run(scenario)


def test_probe_status_is_none_on_a_closed_port() -> None:
    assert asyncio.run(probe_status(f"http://127.0.0.1:{free_port()}/health", 1.0)) is None


# -- the rule in the supervisor, with a scripted probe --------------------------------------------


def test_count_resets_on_any_answer_and_a_hang_restarts(tmp_path: Path) -> None:
    # Ready, then two silent checks, an answer, two more silent, a 503: never 3 in a row.
    probe = ScriptedProbe([200, None, None, 200, None, None, 503, None, None], then=200)

    async def scenario() -> None:
        sup = Supervisor(FAST, probe=probe)
        sup.start(sleeper_spec(tmp_path))
        await sup.wait_ready(["s"], timeout_s=10)
        first_pid = sup.pid("s")
        await until(lambda: probe.calls > 12)
        assert sup.num_hung("s") == 0 and sup.pid("s") == first_pid
        probe.then = None  # silent from now on
        await until(lambda: sup.num_hung("s") == 1)
        probe.then = 200
        await until(lambda: sup.num_starts("s") == 2 and sup.states()["s"] is ChildState.READY)
        assert sup.pid("s") not in (None, first_pid)
        await sup.stop()

    run(scenario)


def test_silence_before_the_first_readiness_is_not_a_hang(tmp_path: Path) -> None:
    # 30 silent checks while "loading" (vLLM opens its port only when loaded), then ready.
    probe = ScriptedProbe([None] * 30, then=200)

    async def scenario() -> None:
        sup = Supervisor(FAST, probe=probe)
        sup.start(sleeper_spec(tmp_path))
        await sup.wait_ready(["s"], timeout_s=10)
        assert probe.calls == 31
        assert sup.num_starts("s") == 1 and sup.num_hung("s") == 0
        await sup.stop()

    run(scenario)


def test_a_hang_shares_the_crash_backoff(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    probe = ScriptedProbe([], then=200)

    async def scenario() -> None:
        sup = Supervisor(FAST, probe=probe)
        sup.start(sleeper_spec(tmp_path))
        await sup.wait_ready(["s"], timeout_s=10)
        os.kill(sup.pid("s") or 0, signal.SIGKILL)  # a crash: backoff 0.2 s, then 0.4 s
        await until(lambda: sup.num_starts("s") == 2 and sup.states()["s"] is ChildState.READY)
        probe.then = None  # a hang: the next restart waits the doubled backoff
        await until(lambda: sup.num_hung("s") == 1)
        probe.then = 200
        await until(lambda: sup.num_starts("s") == 3 and sup.states()["s"] is ChildState.READY)
        await sup.stop()

    run(scenario)
    restarts = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert len(restarts) == 2, restarts
    assert "s exited with code -9" in restarts[0] and "restarting in 0.2 s" in restarts[0]
    assert "s was hung and killed" in restarts[1] and "restarting in 0.4 s" in restarts[1]
    assert "s is hung: 3 health checks in a row without an answer" in caplog.text


def test_not_applied_when_off_or_opted_out(tmp_path: Path) -> None:
    async def scenario(policy: RestartPolicy, spec: ProcessSpec) -> None:
        probe = ScriptedProbe([200], then=None)
        sup = Supervisor(policy, probe=probe)
        sup.start(spec)
        await sup.wait_ready(["s"], timeout_s=10)
        await asyncio.sleep(0.5)
        assert sup.num_hung("s") == 0 and sup.num_starts("s") == 1
        await sup.stop()

    off = RestartPolicy(**{**FAST.__dict__, "hung_after": 0})
    run(lambda: scenario(off, sleeper_spec(tmp_path)))
    run(lambda: scenario(FAST, sleeper_spec(tmp_path, restart_if_hung=False)))


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RestartPolicy(**{**FAST.__dict__, "hung_kill_grace_s": 0.3})
    probe = ScriptedProbe([200], then=None)
    spec = ProcessSpec(
        name="s",
        argv=(sys.executable, "-c",
              "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"),
        env=dict(os.environ),
        log_path=tmp_path / "s.log",
        health_url="http://scripted/health",
    )  # fmt: skip

    async def scenario() -> None:
        sup = Supervisor(policy, probe=probe)
        sup.start(spec)
        await sup.wait_ready(["s"], timeout_s=10)
        await until(lambda: sup.num_starts("s") == 2)
        assert sup.num_hung("s") >= 1
        await sup.stop()

    run(scenario)
    assert "s was hung and killed (exit code -9)" in caplog.text


# -- a real server, stopped with SIGSTOP ------------------------------------------------------


def test_sigstopped_server_is_killed_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = fake_spec(tmp_path, "a")
    # SIGTERM would do nothing to a stopped process: it must get SIGKILL at once, not after this.
    policy = RestartPolicy(**{**FAST.__dict__, "hung_kill_grace_s": 30.0})

    async def scenario() -> None:
        sup = Supervisor(policy)
        sup.start(spec)
        await sup.wait_ready(["a"], timeout_s=15)
        first_pid = sup.pid("a")
        assert first_pid is not None
        os.kill(first_pid, signal.SIGSTOP)
        await until(
            lambda: sup.num_starts("a") == 2 and sup.states()["a"] is ChildState.READY,
            timeout_s=10,
        )
        assert sup.num_hung("a") == 1
        assert sup.pid("a") not in (None, first_pid)
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)  # killed and reaped
        assert await probe_status(spec.health_url or "", 1.0) == 200
        await sup.stop()

    run(scenario)
    assert "a is hung:" in caplog.text and "is stopped (SIGSTOP)" in caplog.text
    assert "a was hung and killed (exit code -9)" in caplog.text


def test_sigstop_while_starting_is_waited_out(tmp_path: Path) -> None:
    """A stopped (or silent) process before its first readiness is left alone."""
    spec = fake_spec(tmp_path, "a", "--ready-after-s", "0.5")

    async def scenario() -> None:
        sup = Supervisor(FAST)
        sup.start(spec)
        await until(lambda: sup.pid("a") is not None)
        pid = sup.pid("a") or 0
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(1.5)  # about 4 hang periods at FAST's settings
        assert sup.pid("a") == pid and sup.num_starts("a") == 1
        os.kill(pid, signal.SIGCONT)
        await sup.wait_ready(["a"], timeout_s=15)
        assert sup.pid("a") == pid and sup.num_hung("a") == 0
        await sup.stop()

    run(scenario)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nX-Vlserve-Health: stalled\r\n\r\n", None),
        (b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\nx-vlserve-health: stalled\r\n\r\n", None),
        (b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\n\r\n", 503),  # draining
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 200),
    ],
)
def test_a_stalled_engine_counts_as_no_answer(head: bytes, expected: int | None) -> None:
    """/health's 503 with the stalled header (a stuck device call, the event loop still up) is
    a hang for launch; any other 503 (draining, loading) is an answer."""

    async def scenario() -> int | None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await probe_status(f"http://127.0.0.1:{port}/health", 2.0)

    assert asyncio.run(scenario()) == expected
