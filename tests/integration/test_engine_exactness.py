"""Continuous batching is exact: every request's greedy tokens equal its own `model.generate`.

Randomized: a different mix each run (requests of text, one or two images of different sizes,
different prompt lengths, arrivals while others decode, cancellations). Reproduce a failure with
VLSERVE_TEST_SEED=<the printed seed>.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
import torch

from vlserve.engine.device import DeviceInfo
from vlserve.engine.engine import AsyncEngine, EngineConfig
from vlserve.engine.request import GenerationRequest, SamplingParams
from vlserve.engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.integration

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "你好",
    "世界",
    "🎉",
    "image",
    "picture",
    "scene",
]
SIZES = [(448, 448), (224, 320), (640, 360), (96, 160)]


def _image(rng: random.Random, size: tuple[int, int]):  # type: ignore[no-untyped-def]
    from PIL import Image

    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(200):
        image.putpixel(
            (rng.randrange(size[0]), rng.randrange(size[1])),
            tuple(rng.randrange(256) for _ in range(3)),
        )
    return image


def _messages(rng: random.Random) -> list[dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60)))
    parts: list[dict] = [{"type": "text", "text": text}]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        parts.insert(
            rng.randrange(len(parts) + 1),
            {"type": "image", "image": _image(rng, rng.choice(SIZES))},
        )
    messages = [{"role": "user", "content": parts}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": "Be brief."}]})
    return messages


async def _drive(engine: AsyncEngine, rng: random.Random, count: int):  # type: ignore[no-untyped-def]
    plans = []
    for i in range(count):
        plans.append(
            {
                "messages": _messages(rng),
                "max_tokens": rng.randrange(3, 28),
                "delay_s": 0.0 if rng.random() < 0.4 else rng.random() * 0.8,  # bursts and trickles
                "cancel_after": rng.randrange(1, 4) if rng.random() < 0.2 else None,
                "encode_ahead": rng.random() < 0.7,  # as the server does; else the prefill encodes
                "id": f"r{i}",
            }
        )

    async def one(plan: dict) -> tuple[dict, dict, list[int], bool]:
        await asyncio.sleep(plan["delay_s"])
        inputs = await engine.prepare(plan["messages"])
        reference_inputs = dict(inputs)
        if plan["encode_ahead"]:
            inputs = await engine.encode(inputs)
        req = GenerationRequest(
            plan["id"],
            inputs,
            inputs["input_ids"][0].tolist(),
            SamplingParams(max_tokens=plan["max_tokens"], temperature=0),
        )
        tokens: list[int] = []
        stream = engine.submit(req)
        cancelled = False
        async for event in stream:
            assert event.error is None, event.error
            tokens.extend(event.token_ids)
            if plan["cancel_after"] is not None and len(tokens) >= plan["cancel_after"]:
                await stream.aclose()
                cancelled = not event.finished
                break
        return plan, reference_inputs, tokens, cancelled

    return await asyncio.gather(*(one(p) for p in plans))


def test_batched_greedy_equals_generate(tiny_model_path: Path) -> None:
    seed = int(os.environ.get("VLSERVE_TEST_SEED") or random.randrange(2**31))
    print(f"VLSERVE_TEST_SEED={seed}")
    rng = random.Random(seed)
    engine = AsyncEngine(
        EngineConfig(
            str(tiny_model_path),
            SchedulerConfig(max_num_seqs=4, max_prefill_tokens=600),
            # as on an accelerator, requests waiting for the encoder share its forward (on CPU the
            # server encodes one at a time: the same computation as generate's)
            encoder_batch_patches=32_768,
        ),
        DeviceInfo("cpu", torch.float32),
    )
    engine.start()

    async def main():  # type: ignore[no-untyped-def]
        await engine.wait_ready()
        return await _drive(engine, rng, count=10)

    try:
        results = asyncio.run(main())
        model = engine.runner.model  # type: ignore[union-attr]
        eos = sorted(engine.runner.eos_token_ids)  # type: ignore[union-attr]
    finally:
        engine.shutdown()
    assert engine.num_running == 0 and engine.num_waiting == 0
    for plan, inputs, tokens, cancelled in results:
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=plan["max_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
                top_k=None,
                top_p=None,
                temperature=None,
            )
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        where = f"seed {seed}, request {plan['id']} ({'cancelled' if cancelled else 'complete'})"
        if cancelled:
            assert tokens == expected[: len(tokens)], where
        else:
            assert tokens == expected, where
