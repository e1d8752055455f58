"""RequestStream: one request's TokenEvents, as an async iterator; closing it aborts the request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from vlserve.engine.request import FinishReason, TokenEvent
from vlserve.errors import VLServeError


class RequestStream:
    """Async iterator over one request's TokenEvents; ``aclose()`` (or leaving early) aborts it."""

    def __init__(
        self,
        request_id: str,
        queue: asyncio.Queue[TokenEvent],
        abort: Callable[[], None],
        counts: Callable[[], tuple[int, int]],
    ) -> None:
        self.request_id = request_id
        self._abort = abort
        self._counts = counts  # (prompt tokens, completion tokens so far)
        self._queue = queue
        self._finished = False
        self.queue_s: float | None = None  # set by the engine when its first prefill starts

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self._abort()
            raise
        if event.finished:
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
