"""Supervisor against real child processes (a small fake HTTP server): readiness, restarts, stops."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from vlserve.errors import VLServeError
from vlserve.launch.supervisor import (
    ChildState,
    ProcessSpec,
    RestartPolicy,
    Supervisor,
    probe_health,
)
from vlserve.testing.server import free_port

FAKE_SERVER = Path(__file__).with_name("launch_fake_server.py")
FAST = RestartPolicy(
    initial_backoff_s=0.05,
    max_backoff_s=0.2,
    stable_after_s=0.1,
    max_startup_failures=2,
    health_interval_s=0.05,
    stop_timeout_s=5.0,
)


def fake_spec(tmp_path: Path, name: str, *extra: str, port: int | None = None) -> ProcessSpec:
    port = port or free_port()
    return ProcessSpec(
        name=name,
        argv=(sys.executable, str(FAKE_SERVER), "--port", str(port), *extra),
        env=dict(os.environ),
        log_path=tmp_path / f"{name}.log",
        health_url=f"http://127.0.0.1:{port}/health",
    )


def test_child_becomes_ready_and_stops_cleanly(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = Supervisor(FAST)
        sup.start(fake_spec(tmp_path, "a", "--ready-after-s", "0.3"))
        await sup.wait_ready(["a"], timeout_s=20)
        assert sup.states() == {"a": ChildState.READY}
        await sup.stop()
        assert sup.states() == {"a": ChildState.STOPPED}
        assert sup.num_starts("a") == 1

    asyncio.run(scenario())
    assert "start #1" in (tmp_path / "a.log").read_text()


def test_crashed_child_is_restarted_and_ready_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = Supervisor(FAST)
        spec = fake_spec(tmp_path, "a")
        sup.start(spec)
        await sup.wait_ready(["a"], timeout_s=20)
        pid = sup.pid("a")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(400):
            await asyncio.sleep(0.05)
            if sup.num_starts("a") == 2 and sup.states()["a"] is ChildState.READY:
                break
        assert sup.num_starts("a") == 2
        assert sup.states()["a"] is ChildState.READY
        assert await probe_health(spec.health_url or "")
        await sup.stop()

    asyncio.run(scenario())


def test_child_that_never_gets_ready_is_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        sup = Supervisor(FAST)
        sup.start(fake_spec(tmp_path, "bad", "--exit-code", "3"))
        with pytest.raises(VLServeError, match="gave up on: bad"):
            await sup.wait_ready(["bad"], timeout_s=20)
        assert sup.states()["bad"] is ChildState.FAILED
        assert sup.num_starts("bad") == FAST.max_startup_failures
        await sup.stop()

    asyncio.run(scenario())
    # The reason is in our log, with the child's own last words.
    assert "exited with code 3" in caplog.text
    assert "fake server exiting with 3" in caplog.text


def test_wait_ready_times_out_naming_the_late_child(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = Supervisor(FAST)
        sup.start(fake_spec(tmp_path, "fast"))
        sup.start(fake_spec(tmp_path, "slow", "--ready-after-s", "60"))
        with pytest.raises(VLServeError, match="not ready after .*: slow$"):
            await sup.wait_ready(["fast", "slow"], timeout_s=1.5)
        await sup.stop()

    asyncio.run(scenario())


def test_stop_kills_a_child_that_ignores_its_stop_signal(tmp_path: Path) -> None:
    policy = RestartPolicy(
        initial_backoff_s=0.05, max_backoff_s=0.1, health_interval_s=0.05, stop_timeout_s=0.5
    )

    async def scenario() -> None:
        sup = Supervisor(policy)
        sup.start(fake_spec(tmp_path, "stubborn", "--ignore-sigterm"))
        sup.start(fake_spec(tmp_path, "polite"))
        await sup.wait_ready(["stubborn", "polite"], timeout_s=20)
        await sup.stop([["stubborn"], ["polite"]])
        assert set(sup.states().values()) == {ChildState.STOPPED}
        assert sup.pid("stubborn") is None

    asyncio.run(scenario())


def test_stop_request_ends_wait_ready_without_failure(tmp_path: Path) -> None:
    async def scenario() -> bool:
        sup = Supervisor(FAST)
        sup.start(fake_spec(tmp_path, "slow", "--ready-after-s", "60"))
        asyncio.get_running_loop().call_later(0.3, sup.request_stop)
        with pytest.raises(VLServeError, match="stop requested"):
            await sup.wait_ready(["slow"], timeout_s=20)
        await sup.stop()
        return await sup.wait_stop_or_failure()

    assert asyncio.run(scenario()) is True


def test_probe_health_is_false_on_a_closed_port() -> None:
    assert asyncio.run(probe_health(f"http://127.0.0.1:{free_port()}/health", timeout_s=1)) is False


def test_restart_policy_validation() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial_backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError):
        RestartPolicy(max_startup_failures=0)
