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
from vlserve.engine.request import GenerationRequest, SamplingParams
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
    before = torch.get_num_threads()
    cpu = DeviceInfo("cpu", torch.float32)
    assert _in_thread(lambda: (bind_thread(cpu), torch.get_num_threads())[1]) == before
    side = _in_thread(lambda: (bind_thread(cpu, side=True), torch.get_num_threads())[1])
    assert side == max(1, before // 2)
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


def test_a_failed_encode_fails_only_its_request(tiny_model_path: Path) -> None:
    engine = AsyncEngine(EngineConfig(str(tiny_model_path)), DeviceInfo("cpu", torch.float32))

    async def scenario() -> tuple[dict, list[int], int]:
        runner = engine.runner
        assert runner is not None
        real = runner.encode
        failures = [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), KeyError("x")]

        def flaky(prompts: list[dict]) -> list[dict]:
            if failures:
                raise failures.pop(0)
            return real(prompts)

        runner.encode = flaky  # type: ignore[method-assign]
        inputs = await engine.prepare(MESSAGES)
        with pytest.raises(EngineError, match="ran out of memory"):
            await engine.encode(inputs)
        with pytest.raises(EngineError, match="encoding the images failed"):
            await engine.encode(inputs)
        ids = inputs["input_ids"][0].tolist()
        encoded = await engine.encode(inputs)
        request = GenerationRequest(
            "ok", encoded, ids, SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
        )
        tokens = [t async for event in engine.submit(request) for t in event.token_ids]
        return encoded, tokens, ids.count(IMAGE_PAD)

    encoded, tokens, image_tokens = _run(engine, scenario)
    assert "pixel_values" not in encoded
    assert encoded["image_embeds"].shape[0] == image_tokens
    assert len(encoded["deepstack"]) == 2  # the tiny model's deepstack_visual_indexes
    assert len(tokens) == 5

    # --no-encoder-thread: encode() hands the inputs back and the prefill encodes them, same tokens
    inline = AsyncEngine(
        EngineConfig(str(tiny_model_path), encoder_thread=False), DeviceInfo("cpu", torch.float32)
    )

    async def without_thread() -> tuple[bool, list[int]]:
        inputs = await inline.prepare(MESSAGES)
        ids = inputs["input_ids"][0].tolist()
        same = await inline.encode(inputs)
        request = GenerationRequest(
            "inline", same, ids, SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
        )
        return same is inputs, [
            t async for event in inline.submit(request) for t in event.token_ids
        ]

    handed_back, inline_tokens = _run(inline, without_thread)
    assert handed_back and inline_tokens == tokens
