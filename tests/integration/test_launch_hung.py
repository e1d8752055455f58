"""`vlserve launch` end to end: an instance stopped with SIGSTOP is killed and restarted.

Fake instances (no model), fast health flags: a few seconds. With nginx installed it runs in
front, and must survive the hang (its /health is proxied to the instances).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlserve.launch.nginx import find_nginx

from .test_launch_cluster import (
    FAKE_SERVER,
    free_port_block,
    health_ok,
    http_get,
    launch_series,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_launch_restarts_a_sigstopped_instance(tmp_path: Path) -> None:
    base = free_port_block(3)
    log_path = tmp_path / "launch.log"
    serve = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))}"
    argv = [sys.executable, "-m", "vlserve", "launch", "--model", "m", "--device", "cpu",
            "--num-instances", "2", "--host", "127.0.0.1", "--port", str(base),
            "--serve-command", serve, "--state-dir", str(tmp_path / "state"),
            "--stop-timeout-s", "10", "--ready-timeout-s", "60",
            "--health-interval-s", "0.2", "--health-timeout-s", "1", "--hung-after", "3"]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def text() -> str:
        return log_path.read_text(errors="replace")

    def pids(name: str) -> list[int]:
        return [int(pid) for pid in re.findall(rf"{name} started \(pid (\d+)", text())]

    try:
        wait_for(lambda: "ready: 2 instance(s)" in text() or proc.poll() is not None, 60, text)
        assert proc.poll() is None, text()
        (victim,) = pids("instance-1")
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: "instance-1 is hung: 3 health checks in a row" in text(), 15, text)
        wait_for(lambda: len(pids("instance-1")) == 2, 15, text)
        assert pids("instance-1")[1] != victim
        wait_for(lambda: health_ok(f"http://127.0.0.1:{base + 2}"), 15, text)
        assert "instance-1 was hung and killed (exit code -9)" in text()
        # launch's own series count the hang and the restart, and both instances ready again
        prom = tmp_path / "state" / "launch.prom"
        hung = 'vlserve_launch_hangs_total{process="instance-1"}'
        wait_for(
            lambda: launch_series(prom.read_text()).get(hung) == 1
            and launch_series(prom.read_text())["vlserve_launch_instances_ready"] == 2,
            15,
            prom.read_text,
        )
        series = launch_series(prom.read_text())
        assert series['vlserve_launch_restarts_total{process="instance-1"}'] == 1
        assert series['vlserve_launch_hangs_total{process="instance-0"}'] == 0
        if find_nginx() is not None:  # and nginx serves that file as the front's /metrics
            assert launch_series(http_get(f"http://127.0.0.1:{base}/metrics")).get(hung) == 1
        # Only the stopped instance: not its sibling, not nginx.
        assert len(pids("instance-0")) == 1
        if find_nginx() is not None:
            assert len(pids("nginx")) == 1 and "nginx is hung" not in text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
