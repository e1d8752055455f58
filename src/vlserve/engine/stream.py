"""One request's life in the engine (Sequence) and its event stream to the caller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.request import FinishReason, GenerationRequest, TokenEvent
from vlserve.engine.sampling import RowSampler
from vlserve.errors import VLServeError


@dataclass(eq=False)
class Sequence:
    """A request's life inside the engine (identity equality: the scheduler removes by object)."""

    request: GenerationRequest
    emit: Callable[[TokenEvent], None]
    deadline: float
    request_id: str = ""
    detok: IncrementalDetokenizer | None = None
    sampler: RowSampler | None = None
    output_ids: list[int] = field(default_factory=list)
    aborted: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        self.request_id = self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def max_tokens(self) -> int:
        return self.request.sampling.max_tokens


class RequestStream:
    """Async iterator over one request's TokenEvents; ``aclose()`` (or leaving early) aborts it."""

    def __init__(
        self, seq: Sequence, queue: asyncio.Queue[TokenEvent], abort: Callable[[Sequence], None]
    ) -> None:
        self._abort = abort
        self._seq = seq
        self._queue = queue
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self._abort(self._seq)
            raise
        if event.finished:
            self._finished = True
        return event

    def fail(self, error: VLServeError) -> None:
        """End this stream now with ``error`` (e.g. the server is shutting down); the engine
        drops the request at its next step."""
        if self._finished:
            return
        seq = self._seq
        self._queue.put_nowait(
            TokenEvent(
                "", (), seq.num_prompt_tokens, len(seq.output_ids), FinishReason.ERROR, error
            )
        )
        self._abort(seq)

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._abort(self._seq)
