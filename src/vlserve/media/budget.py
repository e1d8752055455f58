"""Decoding memory: the server-wide budget of bytes that decodes in progress may hold, and each
request's share of it.

A decode learns from the header what it will hold (``decode.decode_cost``,
``video.decode_cost``: the full-size pixels the decoder must produce and the copies made on the
way down to the model's size) and reserves that from its worker thread before decoding any
pixel. A request whose decodes together would need more than ``--max-request-media-mb`` is
refused (400); a decode that does not fit the server's ``--media-memory-mb`` beside the others
in progress waits for room, up to ``MediaConfig.media_wait_timeout_s``, then gets 429.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import threading
import time

from vlserve.errors import MediaError, OverloadedError

MIB = 1024 * 1024
# Decodes that held at least this give their freed memory back to the system when they end.
TRIM_BYTES = 32 * MIB


class MediaMemory:
    """The bytes decodes in progress hold, server-wide; thread-safe (decodes reserve from
    their worker threads)."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self._held = 0
        self._room = threading.Condition()
        # decodes waiting, first come first served: a large one is not starved by small ones
        # that keep fitting beside the others
        self._queue: collections.deque[object] = collections.deque()

    @property
    def held(self) -> int:
        """Bytes reserved by decodes in progress (the /metrics gauge)."""
        return self._held

    @property
    def waiting(self) -> int:
        """Decodes waiting for room."""
        return len(self._queue)

    def acquire(self, nbytes: int, cancelled: threading.Event) -> None:
        """Wait, behind the decodes that came first, until ``nbytes`` fit beside what is held
        (or nothing is held), then hold them; ``OverloadedError`` after ``wait_s``.
        ``cancelled`` (the request went away) ends the wait early."""
        deadline = time.monotonic() + self.wait_s
        turn = object()
        with self._room:
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or (
                    self._held + nbytes > self.capacity and self._held > 0
                ):
                    left = deadline - time.monotonic()
                    if left <= 0 or cancelled.is_set():
                        raise OverloadedError(
                            "media decoding is at the server's memory budget "
                            "(--media-memory-mb); retry shortly"
                        )
                    self._room.wait(min(left, 0.05))
                self._held += nbytes
            finally:
                self._queue.remove(turn)
                self._room.notify_all()  # the next in line may fit now

    def release(self, nbytes: int) -> None:
        with self._room:
            self._held -= nbytes
            self._room.notify_all()


class RequestMedia:
    """What one request's decodes reserve together, at most ``max_bytes``; thread-safe."""

    def __init__(self, memory: MediaMemory, max_bytes: int) -> None:
        self.memory = memory
        self.max_bytes = max_bytes
        self._total = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            total = self._total + nbytes
            if total > self.max_bytes:
                raise MediaError(
                    f"decoding it needs about {_mib(nbytes)} MiB; with the request's other media "
                    f"that is {_mib(total)} MiB, more than the {self.max_bytes // MIB} MiB "
                    "allowed per request (--max-request-media-mb)"
                )
            self._total = total


class Reservation:
    """One decode's hold on the budget: the decoder calls it once with its cost, from its
    worker thread; ``release`` when the thread ends; ``cancel`` when its request is gone."""

    def __init__(self, request: RequestMedia) -> None:
        self.request = request
        self.nbytes = 0
        self.cancelled = threading.Event()

    def __call__(self, nbytes: int) -> None:
        if self.nbytes:
            raise RuntimeError("a decode reserves its memory once")
        self.request.add(nbytes)
        self.request.memory.acquire(nbytes, self.cancelled)
        self.nbytes = nbytes

    def release(self) -> None:
        """From the worker thread, when the decode ends: the budget gets the bytes back, and
        after a large decode so does the system (``trim_heap``)."""
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self.request.memory.release(nbytes)
        if nbytes >= TRIM_BYTES:
            trim_heap()

    def cancel(self) -> None:
        self.cancelled.set()


def _mib(nbytes: int) -> int:
    return -(-nbytes // MIB)


def _load_malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> None:
    """Give the pages glibc's malloc keeps after ``free`` back to the system, in every arena
    (``malloc_trim(0)``). Without it a decoding thread's arena kept hundreds of MiB after its
    decode: four 7000x7000 PNGs in one request left 547 MiB of idle RSS, 1 MiB after a trim,
    which takes about 0.1 ms (benchmarks/media_memory.py, docs/media.md)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)  # type: ignore[operator]
