"""RequestStream's own deadline: a request ends with its 504 at --request-timeout even when the
inference thread never comes back to drop it (a stuck step)."""

from __future__ import annotations

import asyncio
import time

from vlserve.engine.request import FinishReason, TokenEvent
from vlserve.engine.stream import RequestStream
from vlserve.errors import RequestTimeoutError


def test_the_deadline_ends_a_silent_stream_with_a_timeout_and_aborts_it() -> None:
    aborted: list[bool] = []

    async def scenario() -> list[TokenEvent]:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        queue.put_nowait(TokenEvent("a", (1,), 3, 1))
        stream = RequestStream(
            "r", queue, lambda: aborted.append(True), lambda: (3, 1),
            deadline=(time.monotonic() + 0.2, 7.0),
        )  # fmt: skip
        return [event async for event in stream]  # nothing after "a": the engine is stuck

    started = time.monotonic()
    events = asyncio.run(scenario())
    assert time.monotonic() - started < 5
    assert [e.text for e in events] == ["a", ""]
    last = events[-1]
    assert last.finish_reason is FinishReason.ERROR and isinstance(last.error, RequestTimeoutError)
    assert "7 s timeout" in last.error.message
    assert (last.num_prompt_tokens, last.num_completion_tokens) == (3, 1)
    assert aborted == [True]


def test_events_before_the_deadline_pass_untouched() -> None:
    async def scenario() -> list[TokenEvent]:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        queue.put_nowait(TokenEvent("a", (1,), 3, 1, FinishReason.STOP))
        stream = RequestStream(
            "r", queue, lambda: None, lambda: (3, 1), deadline=(time.monotonic() + 30, 30.0)
        )
        return [event async for event in stream]

    events = asyncio.run(scenario())
    assert len(events) == 1 and events[0].finish_reason is FinishReason.STOP


def test_a_cancel_that_meets_an_arriving_event_still_aborts_the_request() -> None:
    """The client leaves (its task is cancelled) in the same loop pass as the engine's next token
    arrives: the reader is cancelled and the request aborted. asyncio.wait_for before 3.12
    returned the token instead, and the request ran on to max_tokens (clean-clone CI)."""
    aborted: list[bool] = []

    async def scenario() -> asyncio.Task[TokenEvent]:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        stream = RequestStream(
            "r", queue, lambda: aborted.append(True), lambda: (3, 0),
            deadline=(time.monotonic() + 30, 30.0),
        )  # fmt: skip
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)  # it waits for the queue
        queue.put_nowait(TokenEvent("a", (1,), 3, 1))  # as the inference thread's emit does
        reader.cancel()  # and the disconnect poll, in the same pass
        await asyncio.wait({reader})
        return reader

    assert asyncio.run(scenario()).cancelled()
    assert aborted == [True]
