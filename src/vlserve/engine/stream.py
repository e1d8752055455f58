"""RequestStream: one request's TokenEvents, as an async iterator; closing it aborts the request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from vlserve.aio import within
from vlserve.engine.request import FinishReason, TokenEvent
from vlserve.errors import RequestTimeoutError, VLServeError


class RequestStream:
    """Async iterator over one request's TokenEvents, of all its ``n`` choices (``event.index``)
    interleaved; it ends after every choice's final event. ``aclose()`` (or leaving early)
    aborts the request."""

    def __init__(
        self,
        request_id: str,
        queue: asyncio.Queue[TokenEvent],
        abort: Callable[[], None],
        counts: Callable[[], tuple[int, int]],
        n: int = 1,
        deadline: tuple[float, float] | None = None,
    ) -> None:
        self.request_id = request_id
        self.n = n
        self._abort = abort
        self._counts = counts  # (prompt tokens, completion tokens so far, all choices)
        self._queue = queue
        self._open = set(range(n))  # choices not finished yet
        self._finished = False
        # (time.monotonic() deadline, the timeout it came from): past it the stream ends with a
        # RequestTimeoutError whatever the inference thread does (it drops the request later)
        self._deadline = deadline

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            if not self._queue.empty():  # most events: a step emits them before this asks
                event = self._queue.get_nowait()
            elif self._deadline is None:
                event = await self._queue.get()
            else:
                event = await within(self._queue.get(), self._deadline[0] - time.monotonic())
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11
            timeout_s = self._deadline[1] if self._deadline else 0.0
            self.fail(RequestTimeoutError(f"request exceeded the server's {timeout_s:g} s timeout"))
            event = self._queue.get_nowait()
        except BaseException:
            self._abort()
            raise
        if event.finished:
            self._open.discard(event.index)
            # an error ends the whole request (fail() and engine failures report on choice 0)
            if not self._open or event.error is not None:
                self._finished = True
        return event

    def fail(self, error: VLServeError) -> None:
        """End this stream now with ``error`` (e.g. the server is shutting down); the engine
        drops the request at its next step."""
        if self._finished:
            return
        prompt, completion = self._counts()
        self._queue.put_nowait(TokenEvent("", (), prompt, completion, FinishReason.ERROR, error))
        self._abort()

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._abort()
