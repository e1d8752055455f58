"""``within()``: ``asyncio.wait_for`` without its lost cancellations, on every Python we run.

Before Python 3.12, ``asyncio.wait_for`` returns the awaited result when its caller is cancelled
in the same pass of the event loop as the awaitable completes: the cancellation is swallowed
(CPython gh-86296). A server that cancels a request's task when its client leaves then keeps
generating to ``max_tokens``: a stream's next token is ready within a step, so the race is won
often (vlserve's CI saw it). ``asyncio.timeout`` fixes it from 3.11, but vendor containers still
run 3.10, so the project has this one helper and no ``asyncio.wait_for`` (ruff bans it).

Invariants:
- a cancellation of the caller always raises ``CancelledError`` and cancels the awaitable (a
  result it had just produced is dropped with it);
- past the timeout the awaitable is cancelled and awaited, then ``asyncio.TimeoutError`` is
  raised (the builtin ``TimeoutError`` from 3.11), unless it finished meanwhile: then its
  result (or exception) is returned as ``wait_for`` does, so nothing it consumed is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``, bounded by ``timeout_s`` seconds (None: unbounded); see the module."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task}, timeout=None if timeout_s is None else max(timeout_s, 0.0))
    except BaseException:  # the caller is cancelled: so is the awaitable, whatever its state
        task.cancel()
        raise
    if not task.done():
        task.cancel()
        try:
            await asyncio.wait({task})
        except BaseException:
            task.cancel()
            raise
        if task.cancelled():
            raise asyncio.TimeoutError
    return task.result()
