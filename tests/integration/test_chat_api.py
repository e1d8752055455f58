"""The OpenAI-compatible API end to end: a real server on the tiny model, the official client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, png_data_url

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "max_tokens": 24}


def _user(text: str, *images: str) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def _stream_text(client: openai.OpenAI, **kwargs) -> tuple[str, list, object]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks, chunks[-1]


def test_health_and_models(server: ServerProcess) -> None:
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["dtype"] == "float32"
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.model, "alias-model"]
    assert all(m["object"] == "model" for m in models["data"])
    # root names the served model, never the weights' path on the server's disk
    assert all(m["root"] == server.model for m in models["data"])
    assert str(server.model_path) not in httpx.get(server.base_url + "/v1/models").text


def test_retrieve_model_by_any_accepted_name(client: openai.OpenAI, server: ServerProcess) -> None:
    card = client.models.retrieve(server.model)
    assert (card.id, card.object, card.owned_by) == (server.model, "model", "vlserve")
    assert client.models.retrieve("alias-model").id == "alias-model"
    path = str(server.model_path)  # a name with slashes, as a checkpoint path is
    r = httpx.get(f"{server.base_url}/v1/models/{path.lstrip('/')}")
    assert r.status_code == 404  # "/v1/models/" + "root/..." is not the path
    r = httpx.get(f"{server.base_url}/v1/models/{path}")
    assert r.status_code == 200 and r.json()["id"] == path
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert info.value.body["param"] == "model"  # type: ignore[index]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'vlserve_requests_total{route="/v1/models/{model}",status="404"}' in metrics


def test_text_string_content_and_usage(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "What is 2 plus 2?"}], **GREEDY
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content  # the untied tiny model emits visible text
    assert r.choices[0].finish_reason == "length"
    # "<|im_start|>user\n" 3 + 8 text tokens + "<|im_end|>\n<|im_start|>assistant\n" 5
    assert r.usage.prompt_tokens == 16
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == 40


def test_ids_are_unique_and_alias_and_path_accepted(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    ids = set()
    for name in (server.model, "alias-model", str(server.model_path)):
        r = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        ids.add(r.id)
        assert r.model == name
    assert len(ids) == 3


def test_one_and_several_images(client: openai.OpenAI, server: ServerProcess) -> None:
    one = client.chat.completions.create(
        model=server.model, messages=_user("Describe this image.", png_data_url()), **GREEDY
    )
    # 448x448 → 196 image tokens; the text-only prompt of the same words is 15 tokens plus 2
    # vision delimiters.
    text_only = client.chat.completions.create(
        model=server.model, messages=_user("Describe this image."), **GREEDY
    )
    assert one.usage.prompt_tokens == text_only.usage.prompt_tokens + 196 + 2
    two = client.chat.completions.create(
        model=server.model,
        messages=_user("Compare", png_data_url(), png_data_url(224, 320, (0, 90, 200), "JPEG")),
        **GREEDY,
    )
    compare_only = client.chat.completions.create(
        model=server.model, messages=_user("Compare"), **GREEDY
    )
    # 224x320 → (224/32)*(320/32) = 70 image tokens; each image adds 2 delimiters
    assert two.usage.prompt_tokens == compare_only.usage.prompt_tokens + 196 + 2 + 70 + 2
    assert two.choices[0].message.content != one.choices[0].message.content


def test_multi_turn_with_system_uses_every_turn(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    base = [{"role": "user", "content": "Hello"}]
    turns = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": png_data_url()}},
            ],
        },
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And now?"},
    ]
    short = client.chat.completions.create(model=server.model, messages=base, **GREEDY)
    full = client.chat.completions.create(model=server.model, messages=turns, **GREEDY)
    assert full.usage.prompt_tokens > short.usage.prompt_tokens + 196
    # the same conversation twice gives the same greedy answer
    again = client.chat.completions.create(model=server.model, messages=turns, **GREEDY)
    assert again.choices[0].message.content == full.choices[0].message.content


@pytest.mark.parametrize("prompt", ["Hello", "你好，世界", "Emoji 🎉🚀 time", "Describe"])
def test_stream_deltas_equal_non_streamed_text(
    client: openai.OpenAI, server: ServerProcess, prompt: str
) -> None:
    kwargs = {
        "model": server.model,
        "messages": _user(prompt, png_data_url()),
        "temperature": 0,
        "max_tokens": 40,
    }
    full = client.chat.completions.create(**kwargs)
    text, chunks, _ = _stream_text(client, **kwargs)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage_and_done(server: ServerProcess) -> None:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_gives_stop_and_truncates(client: openai.OpenAI, server: ServerProcess) -> None:
    kwargs = {
        "model": server.model,
        "messages": _user("Tell me a story"),
        "temperature": 0,
        "max_tokens": 30,
    }
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.find(stop)]
    r = client.chat.completions.create(stop=[stop, "never-appears-xyz"], **kwargs)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == cut
    streamed, chunks, _ = _stream_text(client, stop=stop, **kwargs)
    assert streamed == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client: openai.OpenAI, server: ServerProcess) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model_path)
    kwargs = {"model": server.model, "messages": _user("Go"), "temperature": 0}
    first = client.chat.completions.create(max_tokens=1, **kwargs).choices[0].message.content
    ids = tok.encode(first, add_special_tokens=False)
    r = client.chat.completions.create(
        max_tokens=10, extra_body={"stop_token_ids": ids[:1]}, **kwargs
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


def test_ignore_eos_and_max_completion_tokens(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.chat.completions.create(
        model=server.model,
        messages=_user("Hi"),
        max_completion_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, server: ServerProcess) -> None:
    kwargs = {
        "model": server.model,
        "messages": _user("Once upon a time"),
        "temperature": 1.0,
        "top_p": 0.95,
        "max_tokens": 24,
    }
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    c = client.chat.completions.create(seed=999, **kwargs).choices[0].message.content
    assert a == b
    assert a != c
    text, _, _ = _stream_text(client, seed=1234, **kwargs)
    assert text == a


def test_sampling_parameters_accepted(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.chat.completions.create(
        model=server.model,
        messages=_user("Hi"),
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="someone",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.usage.completion_tokens == 8


def _memory_gauges(server: ServerProcess) -> dict[str, float]:
    """The media and cache memory gauges of /metrics: the series name, with the cache's name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("vlserve_cache_bytes", "vlserve_media_decoding_bytes"):
                assert sample.labels["model_name"] == server.model, sample
                cache = sample.labels.get("cache")
                found[f"{sample.name}:{cache}" if cache else sample.name] = sample.value
    return found


def test_metrics_show_the_memory_held_by_media_and_caches(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    """Issue #23 item 3: each content cache's bytes and the decodes' in flight are exported,
    and an image no cache has seen yet grows all three caches."""
    before = _memory_gauges(server)
    caches = [f"vlserve_cache_bytes:{c}" for c in ("decoded_media", "processed_media", "encoder")]
    assert set(before) == {*caches, "vlserve_media_decoding_bytes"}
    image = png_data_url(96, 64, (17, 171, 71))  # a colour no other test sends
    client.chat.completions.create(
        model=server.model, messages=_user("Describe this image.", image), max_tokens=1
    )
    after = _memory_gauges(server)
    assert after["vlserve_media_decoding_bytes"] == 0  # the decode is over
    assert after[caches[0]] - before[caches[0]] == 96 * 64 * 4  # Pillow's RGB, 4 bytes a pixel
    assert after[caches[1]] > before[caches[1]] and after[caches[2]] > before[caches[2]]
