"""The encoder stage: image features computed ahead of the prefill, on their own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlserve.engine.device import DeviceInfo, bind_thread
from vlserve.engine.engine import AsyncEngine, EngineConfig
from vlserve.engine.prompt import ChatPrompt
from vlserve.engine.request import SamplingParams
from vlserve.errors import EngineError

pytestmark = pytest.mark.integration

IMAGE_PAD = 151655


def _in_thread(work: Callable[[], object]) -> object:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    return out[0]


def test_a_cpu_side_thread_takes_half_the_threads_and_only_for_itself() -> None:
    from vlserve.engine.device import _CPU_THREADS, share_cpu

    before = torch.get_num_threads()
    fresh = _in_thread(torch.get_num_threads)
    cpu = DeviceInfo("cpu", torch.float32)
    assert _in_thread(lambda: (bind_thread(cpu), torch.get_num_threads())[1]) == fresh
    side = _in_thread(lambda: (bind_thread(cpu, side=True), torch.get_num_threads())[1])
    assert side == max(1, _CPU_THREADS // 2)
    idle = _in_thread(lambda: (share_cpu(cpu, busy=False), torch.get_num_threads())[1])
    assert idle == _CPU_THREADS  # nothing decoding: the encoder takes every core
    assert torch.get_num_threads() == before


def test_accelerator_threads_select_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_npu needs set_device in every new thread; the index is the process's device."""
    selected: list[tuple[str, int]] = []

    class FakeBackend:
        def set_device(self, index: int) -> None:
            selected.append((threading.current_thread().name, index))

    monkeypatch.setattr(torch, "npu", FakeBackend(), raising=False)
    _in_thread(lambda: bind_thread(DeviceInfo("npu", torch.bfloat16, index=3), side=True))
    assert len(selected) == 1 and selected[0][1] == 3
    assert selected[0][0] != threading.current_thread().name


MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": Image.new("RGB", (64, 96), (30, 200, 90))},
            {"type": "text", "text": "what colour?"},
        ],
    }
]


def _run(engine: AsyncEngine, scenario: Callable[[], Awaitable[Any]]) -> Any:
    engine.start()

    async def main() -> Any:
        await engine.wait_ready()
        return await scenario()

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


GREEDY5 = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)


async def _tokens(engine: AsyncEngine, request_id: str, salt: str | None = None) -> list[int]:
    stream = await engine.generate(ChatPrompt(MESSAGES, cache_salt=salt), GREEDY5, request_id)
    return [t async for event in stream for t in event.token_ids]


def test_a_failed_encode_fails_only_its_request(tiny_model_path: Path) -> None:
    engine = AsyncEngine(EngineConfig(str(tiny_model_path)), DeviceInfo("cpu", torch.float32))

    async def scenario() -> list[int]:
        runner = engine.runner
        assert runner is not None
        real = runner.encode
        failures = [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), KeyError("x")]

        def flaky(prompts: list[Any], **kw: Any) -> list[Any]:
            if failures:
                raise failures.pop(0)
            return real(prompts, **kw)

        runner.encode = flaky  # type: ignore[method-assign]
        with pytest.raises(EngineError, match="ran out of memory"):
            await _tokens(engine, "oom")
        with pytest.raises(EngineError, match="encoding the images failed"):
            await _tokens(engine, "broken")
        return await _tokens(engine, "ok")

    tokens = _run(engine, scenario)
    assert len(tokens) == 5
    assert engine.num_running == 0 and engine.num_waiting == 0

    # --no-encoder-thread: the prefill computes the image features, same tokens
    inline = AsyncEngine(
        EngineConfig(str(tiny_model_path), encoder_thread=False), DeviceInfo("cpu", torch.float32)
    )
    assert _run(inline, lambda: _tokens(inline, "inline")) == tokens


def test_encoder_cache_runs_the_vision_tower_once_per_image(tiny_model_path: Path) -> None:
    """The two identical images of MESSAGES and every later request reuse one encoding; a cache
    of 0 bytes encodes every time. Different salts skip the prefix cache, not the encoder cache."""
    counts: dict[str, int] = {}

    def engine_with(name: str, mb: int) -> AsyncEngine:
        engine = AsyncEngine(
            EngineConfig(str(tiny_model_path), encoder_cache_mb=mb),
            DeviceInfo("cpu", torch.float32),
        )

        async def scenario() -> list[list[int]]:
            runner = engine.runner
            assert runner is not None
            real = runner._vision
            counts[name] = 0

            def counting(images: list[Any]) -> Any:
                counts[name] += len(images)
                return real(images)

            runner._vision = counting  # type: ignore[method-assign]
            return [await _tokens(engine, f"r{i}", salt=f"s{i}") for i in range(3)]

        results = _run(engine, scenario)
        assert results[0] == results[1] == results[2]
        return engine

    engine_with("cached", 64)
    engine_with("off", 0)
    assert counts == {"cached": 1, "off": 3}  # an image repeated in one request: once


def test_stopping_the_engine_answers_every_request_in_flight(tiny_model_path: Path) -> None:
    """A request still generating when the engine stops gets a 503 event, not silence."""
    engine = AsyncEngine(EngineConfig(str(tiny_model_path)), DeviceInfo("cpu", torch.float32))
    engine.start()

    async def main() -> list[Any]:
        await engine.wait_ready()
        params = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0)
        stream = await engine.generate(ChatPrompt(MESSAGES), params, "long")
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 3:
                await asyncio.to_thread(engine.shutdown)
        return events

    events = asyncio.run(main())
    last = events[-1]
    assert last.finished and last.error is not None and last.error.status == 503
    assert "shutting down" in str(last.error)
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_a_full_encoder_cache_hit_skips_the_encoder_thread(tiny_model_path: Path) -> None:
    """A prompt whose images are all in the encoder cache (and a text-only one) is encoded on
    the preprocessing thread: it never queues behind another request's vision forward."""
    engine = AsyncEngine(EngineConfig(str(tiny_model_path)), DeviceInfo("cpu", torch.float32))
    threads: list[str] = []

    async def scenario() -> list[list[int]]:
        runner = engine.runner
        assert runner is not None
        real = runner.encode

        def tracking(prompts: list[Any], **kw: Any) -> list[Any]:
            threads.append(threading.current_thread().name)
            return real(prompts, **kw)

        runner.encode = tracking  # type: ignore[method-assign]
        first = await _tokens(engine, "miss", salt="a")
        second = await _tokens(engine, "hit", salt="b")  # another salt: no prefix-cache hit
        text = ChatPrompt([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        stream = await engine.generate(text, GREEDY5, "text")
        assert len([t async for event in stream for t in event.token_ids]) == 5
        return [first, second]

    first, second = _run(engine, scenario)
    assert first == second
    assert threads == ["vlserve-encoder"]  # only the miss
