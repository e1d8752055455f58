"""Health probes and the hung-instance rule of `vlserve launch`.

A probe asks ``GET /health`` and reports the HTTP status, or None when no answer came at all
(connection refused or reset, nothing within the timeout, not HTTP). Only None is a failed
liveness check: any status, 503 included, proves that the server's event loop answers. A 503
after readiness means the server is draining (it exits by itself within its shutdown timeout)
or over its connection limit, and an engine that failed makes the server exit 1: none of those
is a hang, and restarting a draining server would cut its in-flight requests short. A server
that is stopped (SIGSTOP), deadlocked, or stuck on exit with its port closed does not answer.
One 503 is a hang all the same: the one whose ``STALLED_HEADER`` says the engine has made no
progress for ``--engine-stall-timeout`` (a device call that never returns, while the event loop
still answers); the probe reports it as no answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

from vlserve.aio import within

# `vlserve serve`'s /health sets it to "stalled" on its 503 when the engine is stuck.
STALLED_HEADER = "x-vlserve-health"
# (url, timeout_s) -> HTTP status, or None when nothing answered (or the engine is stalled).
Probe = Callable[[str, float], Awaitable["int | None"]]


async def probe_status(url: str, timeout_s: float = 5.0) -> int | None:
    """The status of a GET on ``url``, or None if no HTTP answer arrives within ``timeout_s``.

    Plain asyncio: no HTTP client dependency needed. The timeout covers connecting and the
    status line together: a stopped process still gets its connections accepted by the kernel.
    """
    try:
        return await within(_get_status(url), timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError):
        return None


async def probe_health(url: str, timeout_s: float = 5.0) -> bool:
    """True if a GET on ``url`` answers 200."""
    return await probe_status(url, timeout_s) == 200


async def _get_status(url: str) -> int | None:
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        writer.write(request.encode())
        await writer.drain()
        status_line = await reader.readline()
        head = []
        while len(head) < 100 and (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            head.append(line.lower())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return None
    if f"{STALLED_HEADER}: stalled".encode() in (h.strip() for h in head):
        return None  # the event loop answers, but the engine makes no progress: a hang
    return int(fields[1])


class HungDetector:
    """Counts liveness checks without an answer in a row; ``hung_after`` of them is a hang.

    Fed only after the instance has been ready once: model loading may legitimately leave the
    port closed (vLLM) or the process busy for many minutes. ``hung_after=0`` never declares one.
    """

    def __init__(self, hung_after: int) -> None:
        if hung_after < 0:
            raise ValueError("hung_after must be 0 (off) or more")
        self.hung_after = hung_after
        self.failures_in_a_row = 0

    def record(self, status: int | None) -> bool:
        """Record one check's outcome; True once the instance counts as hung."""
        self.failures_in_a_row = 0 if status is not None else self.failures_in_a_row + 1
        return self.hung_after > 0 and self.failures_in_a_row >= self.hung_after


def is_stopped(pid: int) -> bool:
    """True if ``pid`` is stopped (SIGSTOP, or traced); False if unknown (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": comm may contain spaces and parentheses, the state follows the last ")".
    state = stat.rpartition(")")[2].split()[:1]
    return state in (["T"], ["t"])
