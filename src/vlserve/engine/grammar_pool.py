"""Grammar compiles with a time budget that can be abandoned: trials in worker processes.

xgrammar's compile is C++ with no way to stop it (mlc-ai/xgrammar#298), and a Python thread
running one cannot be stopped either: before this, one 42-byte ``"pattern": "^.{0,150000}$"``
held the grammar thread for 11 s and every structured request behind it. So a grammar the
server has not compiled yet is first compiled in a worker process (engine/grammar_worker.py,
holding the vocabulary), within the time budget; a worker past the budget, or whose request was
abandoned, is killed and a fresh one started. Workers fork from multiprocessing's fork server,
which imports xgrammar (and torch) once: a replacement starts in a fraction of a second, not
the 9 s of CPU an import costs (so killing workers is cheap, also for someone provoking it).
Like every multiprocessing start method but fork, a worker imports the parent's main script
(not a ``-m`` module's ``__main__``): a script that makes a GuideCompiler with workers needs
the ``if __name__ == "__main__":`` guard.
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
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

T = TypeVar("T")
STARTUP_S = 120.0  # the first worker waits for the fork server to import xgrammar (and torch)
_CONTEXT = multiprocessing.get_context("forkserver")


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
        self._conn, theirs = _CONTEXT.Pipe()
        self.proc = _CONTEXT.Process(
            target=_serve, args=(theirs, os.getpid()), name="vlserve-grammar-worker", daemon=True
        )
        self._lock = threading.Lock()
        self._killed = self._started = False
        self._ready = threading.Event()
        self._failure: str | None = None
        # started on its own thread: the first start waits for the fork server's imports
        threading.Thread(
            target=self._boot, args=(theirs, vocabulary), name="vlserve-grammar-boot", daemon=True
        ).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def _boot(self, theirs: Connection, vocabulary: bytes) -> None:
        try:
            self.proc.start()  # never under the lock: the first start can take seconds
            theirs.close()
            with self._lock:
                self._started = True
                if self._killed:
                    self.proc.kill()
                    raise OSError("killed as it started")
            self._conn.send_bytes(vocabulary)
            if self._answer(time.monotonic() + STARTUP_S) != "ready":
                self._failure = "it answered something other than ready"
        except (OSError, EOFError, TimeoutError) as exc:
            self._failure = f"{type(exc).__name__} {exc}".strip()
        finally:
            self._ready.set()

    def ask(self, kind: str, spec: str, timeout_s: float) -> str | None:
        """None if ``(kind, spec)`` compiles, else what is wrong. TimeoutError past
        ``timeout_s`` (counted from when the worker is ready), EOFError or OSError if it died."""
        self._ready.wait()
        if self._failure is not None:
            raise WorkerUnavailable(f"the grammar worker did not start: {self._failure}")
        self._conn.send((kind, spec))
        answer = self._answer(time.monotonic() + timeout_s)
        return None if answer is None else str(answer)

    def _answer(self, deadline: float) -> object:
        if not self._conn.poll(max(deadline - time.monotonic(), 0)):
            raise TimeoutError
        return self._conn.recv()

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            if self._started:
                with contextlib.suppress(OSError):
                    self.proc.kill()

    def close(self) -> None:
        """Kill and reap (the slot thread that owns it, once nothing reads its connection)."""
        self.kill()
        self._ready.wait()
        if self._started:
            self.proc.join()
        self._conn.close()


def _serve(conn: Connection, server_pid: int) -> None:
    from vlserve.engine.grammar_worker import serve  # imported once, by the fork server

    serve(conn, server_pid)


class _Job:
    def __init__(self, kind: str, spec: str) -> None:
        self.kind, self.spec = kind, spec
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
        _CONTEXT.set_forkserver_preload(["vlserve.engine.grammar_worker"])
        for _ in range(size):
            self._idle.put(self._start())

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._all if w.pid is not None)

    async def run(self, kind: str, spec: str, build: Callable[[], T]) -> T:
        """Trial-compile ``(kind, spec)`` in a worker within the budget, then ``build()`` on
        the same slot. Raises TrialError, TrialTimeout, WorkerDied, WorkersBusy or
        WorkerUnavailable. Cancelled (the client left), a compile in progress is killed."""
        job = _Job(kind, spec)
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
                wrong = worker.ask(job.kind, job.spec, self.timeout_s)
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
        if wrong is not None:
            raise TrialError(wrong)
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
