"""The encoder stage: one thread that runs the vision tower ahead of the prefill, in micro-batches.

Requests that reach it while it is busy are encoded together in its next forward (up to a patch
budget), as a burst of newcomers was when images were encoded inside the batched prefill: on an
accelerator, where small forwards are bound by kernel launches, one forward of many images costs
far less than one per image. A budget of 0 encodes one request at a time (the engine's choice on
CPU, where the cost grows with the images and batching only makes the first wait for the last).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Inputs = TypeVar("Inputs")
Output = TypeVar("Output")


@dataclass
class _Job(Generic[Inputs, Output]):
    inputs: Inputs
    future: asyncio.Future[Output]
    loop: asyncio.AbstractEventLoop
    patches: int

    def settle(self, result: Output | None, error: BaseException | None) -> None:
        """Resolve the caller's future on its own loop, unless the caller is gone."""

        def resolve() -> None:
            if self.future.done():  # cancelled: the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(resolve)


class Encoder(Generic[Inputs, Output]):
    """``await encoder.encode(inputs)`` → encoded inputs, computed on the encoder thread.

    ``patches(inputs)`` is what a job costs against the batch budget.
    """

    def __init__(
        self,
        encode_many: Callable[[list[Inputs]], list[Output]],
        thread_init: Callable[[], None],
        max_batch_patches: int = 32_768,
        patches: Callable[[Inputs], int] = lambda _: 0,
    ) -> None:
        self._encode_many = encode_many
        self._thread_init = thread_init
        self._patches = patches
        self.max_batch_patches = max_batch_patches
        self._jobs: deque[_Job[Inputs, Output]] = deque()
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vlserve-encoder", daemon=True)
        self._thread.start()

    async def encode(self, inputs: Inputs) -> Output:
        loop = asyncio.get_running_loop()
        job: _Job[Inputs, Output] = _Job(inputs, loop.create_future(), loop, self._patches(inputs))
        with self._lock:
            if self._stop:
                raise RuntimeError("the encoder is shut down")
            self._jobs.append(job)
            self._lock.notify()
        return await job.future

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop, and wait for a forward in progress: a thread still inside torch when the
        interpreter exits aborts the process ("terminate called without an active exception")."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _next_batch(self) -> list[_Job[Inputs, Output]]:
        """Wait for work; take the oldest job and whoever else fits the patch budget, in order."""
        with self._lock:
            while not self._jobs and not self._stop:
                self._lock.wait()
            batch: list[_Job[Inputs, Output]] = []
            patches = 0
            while self._jobs and (
                not batch or patches + self._jobs[0].patches <= self.max_batch_patches
            ):
                job = self._jobs.popleft()
                if job.future.done():  # cancelled while waiting
                    continue
                batch.append(job)
                patches += job.patches
            return batch

    def _run(self) -> None:
        """Never dies on an error: a thread that cannot be set up, or a batch that fails, fails
        its callers, and the thread goes on (a dead thread would leave every later caller
        waiting forever)."""
        try:
            self._thread_init()
            broken: Exception | None = None
        except Exception as exc:
            log.exception("the encoder thread could not be set up; every encode will fail")
            broken = exc
        while True:
            batch = self._next_batch()
            if not batch:
                if self._stop:
                    return
                continue
            results, error = self._encode(batch) if broken is None else (None, broken)
            for k, job in enumerate(batch):
                job.settle(None if results is None else results[k], error)

    def _encode(
        self, batch: list[_Job[Inputs, Output]]
    ) -> tuple[list[Output] | None, Exception | None]:
        try:
            results = self._encode_many([job.inputs for job in batch])
        except Exception as exc:
            return None, exc
        if len(results) != len(batch):
            return None, RuntimeError(f"{len(results)} encodings for {len(batch)} requests")
        return results, None
