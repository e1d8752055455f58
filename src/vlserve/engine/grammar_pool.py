"""Grammar compiles with a time budget that can be abandoned: trials in worker processes.

xgrammar's compile is C++ with no way to stop it (mlc-ai/xgrammar#298), and a Python thread
running one cannot be stopped either: before this, one 42-byte ``"pattern": "^.{0,150000}$"``
held the grammar thread for 11 s and every structured request behind it. So a grammar the
server has not compiled yet is first compiled in a worker process
(``python -m vlserve.engine.grammar_worker``, holding the vocabulary), within the time budget;
a worker past the budget, or whose request was abandoned, is killed and a fresh one started.
Only a grammar that compiled there within the budget is then compiled in the server, on the same
slot's thread (so it too takes about the time the trial took). The compiled grammar itself does
not travel back: xgrammar's ``serialize_json`` of a 1.4 MB grammar is 45 MB of JSON and takes
4.5 s (docs/STRUCTURED.md has the figures).

Slots: ``size`` threads, each using one idle worker at a time; a request that waits longer than
the budget for a slot is told the server is busy (429), not that its schema is bad.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
STARTUP_S = 120.0  # a worker imports xgrammar (and torch) and reads the vocabulary once


class TrialError(Exception):
    """The schema did not compile in the worker; the message says why."""


class TrialTimeout(Exception):
    """The compile ran past the budget (its worker was killed)."""


class WorkerDied(Exception):
    """The worker died while compiling (crashed or was killed by the system)."""


class WorkerUnavailable(Exception):
    """No worker could be started."""


class WorkersBusy(Exception):
    """No slot was free within the budget."""


class _Worker:
    """One worker process; used by one slot thread at a time, killed from any thread."""

    def __init__(self, vocabulary: bytes) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlserve.engine.grammar_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buffer = b""
        self._ready = threading.Event()
        self._failure: str | None = None
        threading.Thread(
            target=self._boot, args=(vocabulary,), name="vlserve-grammar-boot", daemon=True
        ).start()

    def _boot(self, vocabulary: bytes) -> None:
        try:
            self._send(vocabulary)
            if self._read_line(time.monotonic() + STARTUP_S) != b"ready":
                self._failure = "it answered something other than ready"
        except (OSError, EOFError, TimeoutError) as exc:
            self._failure = f"{type(exc).__name__} {exc}".strip()
        finally:
            self._ready.set()

    def ask(self, request: bytes, timeout_s: float) -> dict[str, object]:
        """The worker's answer to one trial; TimeoutError past ``timeout_s`` (counted from
        when the worker is ready), EOFError or OSError if it died."""
        self._ready.wait()
        if self._failure is not None:
            raise WorkerUnavailable(f"the grammar worker did not start: {self._failure}")
        self._send(request)
        return json.loads(self._read_line(time.monotonic() + timeout_s))

    def _send(self, line: bytes) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            raise OSError("no pipe to the worker")
        stdin.write(line + b"\n")
        stdin.flush()

    def _read_line(self, deadline: float) -> bytes:
        stdout = self.proc.stdout
        if stdout is None:
            raise OSError("no pipe from the worker")
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("the worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self) -> None:
        """Kill and reap (the slot thread that owns it, once nothing reads its pipes)."""
        self.kill()
        self.proc.wait()
        self._ready.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class _Job:
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.created = time.monotonic()
        self.lock = threading.Lock()
        self.abandoned = False
        self.worker: _Worker | None = None

    def abandon(self) -> None:
        """Its client left: a compile in progress is killed, its slot freed at once."""
        with self.lock:
            self.abandoned = True
            worker = self.worker
        if worker is not None:
            worker.kill()


class GrammarWorkers:
    """``size`` slots, each a thread with a worker process; the workers start now."""

    def __init__(self, vocabulary: bytes, size: int, timeout_s: float) -> None:
        if size < 1 or timeout_s <= 0:
            raise ValueError("grammar workers need a size >= 1 and a positive time budget")
        self.timeout_s = timeout_s
        self._vocabulary = vocabulary
        self._slots = concurrent.futures.ThreadPoolExecutor(
            size, thread_name_prefix="vlserve-grammar"
        )
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        for _ in range(size):
            self._idle.put(self._start())

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.proc.pid for w in self._all)

    async def run(self, kind: str, spec: str, build: Callable[[], T]) -> T:
        """Trial-compile ``(kind, spec)`` in a worker within the budget, then ``build()`` on
        the same slot. Raises TrialError, TrialTimeout, WorkerDied, WorkersBusy or WorkerUnavailable.
        Cancelled (the client left), a compile in progress is killed."""
        job = _Job(json.dumps({"kind": kind, "spec": spec}).encode())
        future = self._slots.submit(self._run, job, build)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # still waiting for a slot: it never starts
            job.abandon()
            raise

    def _run(self, job: _Job, build: Callable[[], T]) -> T:
        if time.monotonic() - job.created > self.timeout_s:
            raise WorkersBusy(
                f"every grammar worker stayed busy for {self.timeout_s:g} s; retry shortly"
            )
        worker = self._idle.get()  # one per slot thread: never waits
        try:
            with job.lock:
                if job.abandoned:
                    raise WorkersBusy("abandoned")  # nobody is waiting for the answer
                job.worker = worker
            try:
                reply = worker.ask(job.request, self.timeout_s)
            except TimeoutError:
                worker = self._replace(worker)
                raise TrialTimeout from None
            except (EOFError, OSError) as exc:
                worker = self._replace(worker)
                raise WorkerDied(str(exc)) from exc
            except WorkerUnavailable:
                worker = self._replace(worker)
                raise
            finally:
                job.worker = None
        finally:
            self._idle.put(worker)
        if "error" in reply:
            raise TrialError(str(reply["error"]))
        return build()

    def _start(self) -> _Worker:
        worker = _Worker(self._vocabulary)
        with self._lock:
            self._all.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        with self._lock:
            self._all.discard(worker)
        worker.close()
        return self._start()

    def shutdown(self) -> None:
        self._slots.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            worker.kill()
