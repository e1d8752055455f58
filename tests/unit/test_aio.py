"""within(): asyncio.wait_for's contract, and a caller's cancellation is never lost."""

from __future__ import annotations

import asyncio

import pytest

from vlserve.aio import within


def test_the_result_and_the_exception_of_the_awaitable_pass_through() -> None:
    async def fail() -> None:
        raise ValueError("inner")

    assert asyncio.run(within(asyncio.sleep(0, result=7), 5)) == 7
    assert asyncio.run(within(asyncio.sleep(0, result=8), None)) == 8
    with pytest.raises(ValueError, match="inner"):
        asyncio.run(within(fail(), 5))


def test_past_the_timeout_the_awaitable_is_cancelled_and_timeouterror_raised() -> None:
    async def scenario() -> asyncio.Future[None]:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        with pytest.raises(asyncio.TimeoutError):
            await within(inner, 0.05)
        return inner

    assert asyncio.run(scenario()).cancelled()
    with pytest.raises(asyncio.TimeoutError):  # a deadline already past still waits no longer
        asyncio.run(within(asyncio.sleep(30), -1.0))


def test_an_awaitable_that_finishes_while_being_cancelled_at_the_timeout_gives_its_result() -> None:
    """As wait_for: what it produced (an item it took off a queue) is not lost to the timeout."""

    async def stubborn() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "finished anyway"
        return "slept"

    assert asyncio.run(within(stubborn(), 0.05)) == "finished anyway"


def test_a_cancel_in_the_same_pass_as_the_result_cancels_the_caller() -> None:
    """The race asyncio.wait_for lost before Python 3.12 (CPython gh-86296): the awaitable's
    result and the caller's cancellation land together; the caller must still see the cancel."""

    async def scenario() -> tuple[asyncio.Task[int], asyncio.Future[int]]:
        inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(within(inner, 30))
        await asyncio.sleep(0.01)
        inner.set_result(1)
        caller.cancel()
        await asyncio.wait({caller})
        return caller, inner

    caller, inner = asyncio.run(scenario())
    assert caller.cancelled()


def test_cancelling_the_caller_cancels_a_pending_awaitable() -> None:
    async def scenario() -> asyncio.Future[None]:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        caller = asyncio.ensure_future(within(inner, 30))
        await asyncio.sleep(0.01)
        caller.cancel()
        await asyncio.wait({caller})
        await asyncio.sleep(0)
        return inner

    assert asyncio.run(scenario()).cancelled()
