"""Work reused across requests: prefix-cache hits are exact, reported in usage, isolated by salt,
and a long request never holds a short one up."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from tests.conftest import ServerProcess, png_data_url, start_server, stop_server
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.device import DeviceInfo
from vlserve.engine.prompt import ChatPrompt
from vlserve.engine.request import SamplingParams
from vlserve.engine.runner import ModelRunner
from vlserve.engine.sequence import Sequence

pytestmark = pytest.mark.integration
BLOCK = 16


@pytest.fixture(scope="module")
def runner(tiny_model_path: Path) -> ModelRunner:
    r = ModelRunner(tiny_model_path, DeviceInfo("cpu", torch.float32))
    r.allocate_kv(257, BLOCK)
    return r


def _prefill(runner: ModelRunner, blocks: BlockManager, messages: list[dict]) -> tuple:  # type: ignore[type-arg]
    encoded = runner.encode([runner.preprocess(ChatPrompt(messages))])[0]
    seq = Sequence.for_prompt("s", encoded, SamplingParams(max_tokens=1))
    blocks.allocate(seq)
    hit = seq.num_cached_tokens
    logits = runner.run([seq], True)
    blocks.commit(seq, seq.num_tokens)
    return logits, hit, encoded


def _image(color: tuple[int, int, int], size: tuple[int, int] = (448, 448)) -> Image.Image:
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 5):
        image.putpixel((x, (x * 7) % size[1]), (x % 256, 90, 255 - x % 256))
    return image


def test_a_hit_gives_the_logits_of_a_full_prefill(runner: ModelRunner) -> None:
    """Same prompt (the hit ends inside the image), then a follow-up turn."""
    image = {"type": "image", "image": _image((200, 40, 40))}
    first = [{"role": "user", "content": [{"type": "text", "text": "look at"}, image]}]
    follow = [
        *first,
        {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the dots?"}]},
    ]
    for messages in (first, follow):
        cold = BlockManager(257, BLOCK, prefix_caching=False)
        reference, hit, _ = _prefill(runner, cold, messages)
        assert hit == 0
        warm = BlockManager(257, BLOCK)
        _prefill(runner, warm, first)
        logits, hit, encoded = _prefill(runner, warm, messages)
        span = encoded.prepared.visuals[0].span
        assert hit > 0
        if messages is first:
            assert span.start < hit < span.end  # the hit splits the image's tokens
        assert float((logits - reference).abs().max()) < 1e-4
        assert int(logits.argmax()) == int(reference.argmax())


def test_a_different_image_behind_the_same_text_does_not_hit(runner: ModelRunner) -> None:
    blocks = BlockManager(257, BLOCK)

    def messages(color: tuple[int, int, int]) -> list[dict]:
        image = {"type": "image", "image": _image(color)}
        return [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]

    _prefill(runner, blocks, messages((10, 200, 10)))
    _, hit, encoded = _prefill(runner, blocks, messages((10, 200, 11)))
    assert hit <= encoded.prepared.visuals[0].span.start


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, url: str, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="tiny-qwen3-vl",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the picture in detail."},
                ],
            }
        ],
        max_tokens=4,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )


def test_cached_tokens_in_usage_and_salt_isolation(server: ServerProcess) -> None:
    client = _client(server)
    url = png_data_url(448, 448, (1, 2, 3))
    first = _ask(client, url)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = _ask(client, url)
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached == (second.usage.prompt_tokens - 1) // BLOCK * BLOCK > 196  # type: ignore[union-attr]
    assert second.choices[0].message.content == first.choices[0].message.content
    salted = _ask(client, url, extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    again = _ask(client, url, extra_body={"cache_salt": "tenant-b"})
    assert again.usage.prompt_tokens_details.cached_tokens == cached  # type: ignore[union-attr]
    assert salted.choices[0].message.content == first.choices[0].message.content


def test_a_short_request_is_not_held_up_by_a_long_one(server: ServerProcess) -> None:
    """One streamed request asks for 65000 tokens: the budget counts what it uses, so a
    one-token request sent beside it is answered at once (it waited minutes before)."""
    client = _client(server)
    started = threading.Event()
    stop = threading.Event()

    def long_stream() -> None:
        stream = client.chat.completions.create(
            model="tiny-qwen3-vl",
            messages=[{"role": "user", "content": "go on forever"}],
            max_tokens=65000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in stream:
            started.set()
            if stop.is_set():
                break
        stream.close()

    worker = threading.Thread(target=long_stream)
    worker.start()
    try:
        assert started.wait(60)
        t0 = time.monotonic()
        short = client.chat.completions.create(
            model="tiny-qwen3-vl", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert short.usage is not None and short.usage.completion_tokens == 1
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        worker.join(60)


def test_no_prefix_cache_flag(tiny_model_path: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model_path, tmp_path, "--no-prefix-cache", "--encoder-cache-mb", "0")
    try:
        client = _client(srv)
        url = png_data_url(224, 224, (9, 9, 9))
        _ask(client, url)
        second = _ask(client, url)
        assert second.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    finally:
        stop_server(srv)
