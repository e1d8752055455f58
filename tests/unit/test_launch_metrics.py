"""The launcher's own series: what the text says, that Prometheus' parser reads it, and that
the file is written from a running supervisor's state."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vlserve.launch.metrics import ChildStatus, publish, render, write_atomically
from vlserve.launch.supervisor import ProcessSpec, RestartPolicy, Supervisor


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_render_counts_ready_instances_restarts_and_hangs() -> None:
    children = [
        ChildStatus("instance-0", True, True, 0, 0),
        ChildStatus("instance-1", True, False, 2, 1),
        ChildStatus("nginx", False, True, 0, 0),
    ]
    got = samples(render(children, 2))
    assert got[("vlserve_launch_instances", ())] == 2
    assert got[("vlserve_launch_instances_ready", ())] == 1  # nginx is not an instance
    assert got[("vlserve_launch_instance_ready", (("process", "instance-1"),))] == 0
    assert ("vlserve_launch_instance_ready", (("process", "nginx"),)) not in got
    assert got[("vlserve_launch_restarts_total", (("process", "instance-1"),))] == 2
    assert got[("vlserve_launch_hangs_total", (("process", "instance-1"),))] == 1
    assert got[("vlserve_launch_hangs_total", (("process", "nginx"),))] == 0


def test_label_values_are_escaped() -> None:
    text = render([ChildStatus('a"b\\c', True, True, 0, 0)], 1)
    assert samples(text)[("vlserve_launch_instance_ready", (("process", 'a"b\\c'),))] == 1


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "launch.prom"
    write_atomically(path, "a 1\n")
    write_atomically(path, "a 2\n")
    assert path.read_text() == "a 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["launch.prom"]


def test_publish_follows_the_supervisor(tmp_path: Path) -> None:
    """A child without a health URL is ready once started; the file says so within an
    interval, and a crash-and-restart shows as a restart."""
    path = tmp_path / "state" / "launch.prom"

    async def main() -> dict:
        supervisor = Supervisor(RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.05))
        argv = (sys.executable, "-c", "import time; time.sleep(0.3)")  # exits: restarted
        supervisor.start(ProcessSpec("instance-0", argv, {}, tmp_path / "i0.log"))
        task = asyncio.ensure_future(publish(supervisor, ["instance-0"], path, 0.05))
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                if path.exists():
                    got = samples(path.read_text())
                    key = ("vlserve_launch_restarts_total", (("process", "instance-0"),))
                    if got.get(key, 0) >= 1:
                        return got
            raise AssertionError(path.read_text() if path.exists() else "no file")
        finally:
            task.cancel()
            await supervisor.stop()

    got = asyncio.run(main())
    assert got[("vlserve_launch_instances", ())] == 1
    assert got[("vlserve_launch_hangs_total", (("process", "instance-0"),))] == 0
