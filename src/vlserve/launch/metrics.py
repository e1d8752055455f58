"""The launcher's own series (instances ready, restarts, hangs) as a Prometheus text file.

The launcher writes the file every health interval, atomically, and its nginx serves it as
``/metrics`` on the front port (docs/METRICS.md); without nginx, node_exporter's textfile
collector can read it. A file, not a server: nothing new listens, and nginx already answers
on the port that Prometheus scrapes for the instances (``/instances/<i>/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlserve.launch.supervisor import ChildState, Supervisor

METRICS_FILE = "launch.prom"  # under --state-dir

logger = logging.getLogger("vlserve.launch")


@dataclass(frozen=True)
class ChildStatus:
    """One supervised process as the series show it."""

    name: str
    is_instance: bool  # a server (counted in instances ready), not nginx
    ready: bool
    restarts: int
    hangs: int


def snapshot(supervisor: Supervisor, instances: Sequence[str]) -> list[ChildStatus]:
    """Every child the supervisor runs; ``instances`` names the servers among them."""
    return [
        ChildStatus(
            name,
            name in instances,
            state is ChildState.READY,
            max(supervisor.num_starts(name) - 1, 0),
            supervisor.num_hung(name),
        )
        for name, state in supervisor.states().items()
    ]


def render(children: Sequence[ChildStatus], num_instances: int) -> str:
    """Prometheus text format (0.0.4); ``process`` labels name the child (``instance`` would
    clash with the label Prometheus gives every target)."""
    servers = [c for c in children if c.is_instance]
    out = [
        *_family("vlserve_launch_instances", "gauge", "instances configured"),
        f"vlserve_launch_instances {num_instances}",
        *_family("vlserve_launch_instances_ready", "gauge", "instances answering /health as ready"),
        f"vlserve_launch_instances_ready {sum(c.ready for c in servers)}",
        *_family("vlserve_launch_instance_ready", "gauge", "1 when the instance is ready"),
        *(f"vlserve_launch_instance_ready{_label(c)} {int(c.ready)}" for c in servers),
        *_family("vlserve_launch_restarts_total", "counter", "restarts after a crash or a hang"),
        *(f"vlserve_launch_restarts_total{_label(c)} {c.restarts}" for c in children),
        *_family(
            "vlserve_launch_hangs_total",
            "counter",
            "times a child was found hung (no answer to /health, or a stalled engine) and killed",
        ),
        *(f"vlserve_launch_hangs_total{_label(c)} {c.hangs}" for c in children),
    ]
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """A reader (nginx, a textfile collector) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def publish(
    supervisor: Supervisor,
    instances: Sequence[str],
    path: Path,
    interval_s: float,
) -> None:
    """Rewrite ``path`` every ``interval_s`` until cancelled."""
    failing = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, render(snapshot(supervisor, instances), len(instances)))
            failing = False
        except OSError as exc:
            if not failing:  # once per spell, not every interval
                logger.warning("cannot write the launcher's metrics to %s: %s", path, exc)
            failing = True
        await asyncio.sleep(interval_s)


def _family(name: str, kind: str, doc: str) -> tuple[str, str]:
    return f"# HELP {name} {doc}", f"# TYPE {name} {kind}"


def _label(child: ChildStatus) -> str:
    value = child.name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{process="{value}"}}'
