"""The encoder stage's batching (torch-free: a fake encode function stands in for the model)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from vlserve.engine.encoder import Encoder


def _inputs(name: str, patches: int) -> dict[str, Any]:
    return {"name": name, "pixel_values": SimpleNamespace(shape=(patches, 1536))}


def _patches(inputs: dict[str, Any]) -> int:
    pixels = inputs.get("pixel_values")
    return 0 if pixels is None else int(pixels.shape[0])


class FakeModel:
    """Records each batch; the first call blocks until released, so a burst can queue behind it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_on = fail_on

    def encode_many(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batches.append([p["name"] for p in prompts])
        self.started.set()
        self.release.wait(5)
        if self.fail_on in self.batches[-1]:
            raise RuntimeError("device out of memory")
        return [{"encoded": p["name"]} for p in prompts]


def _burst(model: FakeModel, encoder: Encoder, jobs: list[dict[str, Any]]) -> list[Any]:
    async def main() -> list[Any]:
        first = asyncio.ensure_future(encoder.encode(jobs[0]))
        await asyncio.to_thread(model.started.wait, 5)  # the encoder is busy with the first
        rest = [asyncio.ensure_future(encoder.encode(j)) for j in jobs[1:]]
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        return asyncio.run(main())
    finally:
        encoder.shutdown()


def test_a_burst_is_encoded_together_in_order_within_the_patch_budget() -> None:
    model = FakeModel()
    encoder = Encoder(model.encode_many, lambda: None, max_batch_patches=2000, patches=_patches)
    jobs = [_inputs("a", 784), _inputs("b", 784), _inputs("c", 784), _inputs("d", 3000)]
    jobs.append({"name": "text-only"})  # no pixels: costs nothing against the budget
    results = _burst(model, encoder, jobs)
    assert results == [{"encoded": j["name"]} for j in jobs]
    # b+c fit 2000 patches; d alone exceeds it, but a batch always takes one job
    assert model.batches == [["a"], ["b", "c"], ["d"], ["text-only"]]


def test_a_zero_budget_encodes_one_request_at_a_time() -> None:
    model = FakeModel()
    encoder = Encoder(model.encode_many, lambda: None, max_batch_patches=0, patches=_patches)
    jobs = [_inputs("a", 784), _inputs("b", 784), _inputs("c", 784)]
    assert _burst(model, encoder, jobs) == [{"encoded": j["name"]} for j in jobs]
    assert model.batches == [["a"], ["b"], ["c"]]


def test_a_failed_batch_fails_its_jobs_and_the_next_batch_runs() -> None:
    model = FakeModel(fail_on="b")
    encoder = Encoder(model.encode_many, lambda: None)
    jobs = [_inputs("a", 10), _inputs("b", 10), _inputs("c", 10)]
    results = _burst(model, encoder, jobs)
    assert results[0] == {"encoded": "a"}
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    assert model.batches == [["a"], ["b", "c"]]
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(encoder.encode(_inputs("late", 1)))


def test_a_caller_gone_before_its_turn_is_not_encoded() -> None:
    model = FakeModel()
    encoder = Encoder(model.encode_many, lambda: None)

    async def main() -> Any:
        first = asyncio.ensure_future(encoder.encode(_inputs("a", 1)))
        await asyncio.to_thread(model.started.wait, 5)
        gone = asyncio.ensure_future(encoder.encode(_inputs("gone", 1)))
        kept = asyncio.ensure_future(encoder.encode(_inputs("kept", 1)))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        model.release.set()
        return await asyncio.gather(first, kept)

    try:
        assert asyncio.run(main()) == [{"encoded": "a"}, {"encoded": "kept"}]
    finally:
        encoder.shutdown()
    assert model.batches == [["a"], ["kept"]]


def test_a_thread_that_cannot_be_set_up_fails_every_encode_instead_of_hanging() -> None:
    def broken_init() -> None:
        raise RuntimeError("set_device failed")

    encoder = Encoder(FakeModel().encode_many, broken_init)

    async def main() -> list[Any]:
        jobs = [encoder.encode(_inputs(name, 1)) for name in ("a", "b")]
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 5)

    try:
        results = asyncio.run(main())
    finally:
        encoder.shutdown()
    assert [str(r) for r in results] == ["set_device failed"] * 2


def test_a_caller_whose_loop_closed_does_not_kill_the_thread() -> None:
    model = FakeModel()
    encoder = Encoder(model.encode_many, lambda: None)

    async def give_up() -> None:
        await asyncio.wait_for(encoder.encode(_inputs("abandoned", 1)), 0.1)

    try:
        with pytest.raises(TimeoutError):
            asyncio.run(give_up())  # its loop is closed while the encoder still works on it
        model.release.set()
        assert asyncio.run(encoder.encode(_inputs("next", 1))) == {"encoded": "next"}
    finally:
        encoder.shutdown()
    assert model.batches == [["abandoned"], ["next"]]
