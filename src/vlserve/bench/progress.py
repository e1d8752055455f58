"""A dependency-free progress line on stderr: a bar on terminals, a periodic line in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vlserve.bench.client import RequestResult


class Progress:
    """Counts finished requests; redraws at most every ``interval_s`` (cheap at 1,000+ req/s)."""

    def __init__(
        self, total: int | None, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.interval_s = 0.2 if self.tty else 10.0
        self.ok = 0
        self.failed = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, result: RequestResult) -> None:
        if result.success:
            self.ok += 1
        else:
            self.failed += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        done = self.ok + self.failed
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            filled = int(30 * done / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}"
        else:
            bar = f"{done} done"
        text = f"{bar}  ok {self.ok}  failed {self.failed}  {rate:.1f} req/s  {elapsed:.0f}s"
        if self.tty:
            self.stream.write("\r" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
