"""Grammar compiles in worker processes (engine/grammar_pool.py), with the real Qwen vocabulary:
a compile past the budget is a 400 within it, an abandoned compile is killed and frees its slot,
and json_object or a cached spec never waits behind another request's compile."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vlserve.engine.guided import GuideCompiler
from vlserve.engine.request import Guide
from vlserve.engine.vocab import TokenBytes
from vlserve.errors import InvalidRequestError

# 42 bytes of schema that xgrammar takes 11 s to compile (issue 22)
SLOW = Guide(
    "json_schema",
    json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "^.{0,150000}$"}}}),
)
QUICK = Guide("json_schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}}))
BUDGET_S = 1.5


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer: Any) -> Iterator[GuideCompiler]:
    made = GuideCompiler(
        TokenBytes(tiny_tokenizer, 151_936),
        tiny_tokenizer,
        [151645, 151643],
        workers=1,
        timeout_s=BUDGET_S,
    )
    asyncio.run(made.obtain(QUICK))  # the worker has started (once) and compiles
    yield made
    made.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # killed but not reaped yet counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_schema_past_the_budget_is_a_400_within_it(compiler: GuideCompiler) -> None:
    start = time.monotonic()
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(compiler.obtain(SLOW))
    took = time.monotonic() - start
    assert info.value.code == "grammar_too_complex" and info.value.param == "response_format"
    assert "1.5 s" in info.value.message
    assert took < BUDGET_S + 1.5, took  # the budget, and not the 11 s the compile needs
    start = time.monotonic()
    with pytest.raises(InvalidRequestError):  # asked again: the verdict is cached
        asyncio.run(compiler.obtain(SLOW))
    assert time.monotonic() - start < 0.5


def test_an_abandoned_compile_is_killed_and_frees_its_slot(compiler: GuideCompiler) -> None:
    workers = compiler.workers
    assert workers is not None
    slow = Guide("json_schema", json.dumps({"type": "string", "pattern": "^.{0,150001}$"}))

    async def abandon() -> tuple[float, float]:
        while not workers.pids:  # the worker the last test's timeout killed is replaced
            await asyncio.sleep(0.05)
        (pid,) = workers.pids
        task = asyncio.ensure_future(compiler.obtain(slow))
        await asyncio.sleep(0.5)  # the worker is compiling it
        cached = time.monotonic()
        await compiler.obtain(QUICK)  # a cached spec does not wait for the slot
        await compiler.obtain(Guide("json_object"))  # nor does json_object
        cached = time.monotonic() - cached
        task.cancel()
        gone = time.monotonic()
        while _alive(pid) and time.monotonic() - gone < 5:
            await asyncio.sleep(0.05)
        gone = time.monotonic() - gone
        with pytest.raises(asyncio.CancelledError):
            await task
        return cached, gone

    workers.timeout_s = 60.0  # only the cancellation may stop it here
    try:
        cached, gone = asyncio.run(abandon())
    finally:
        workers.timeout_s = BUDGET_S
    assert cached < 0.1, cached
    assert gone < 1.0, gone  # killed at once, not left compiling for seconds
    fresh = Guide("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    assert asyncio.run(compiler.obtain(fresh)) is not None  # the slot works again
