"""End of sequence, end to end: a checkpoint whose greedy answer is a known script then EOS.

Random weights never emit EOS, so these are the only tests where a request ends by itself
(``finish_reason: "stop"`` from the model), where the detokenizer's final flush matters, and
where a prefix-cache hit must reproduce a known text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import ServerProcess, png_data_url, start_server, stop_server
from vlserve.testing.scripted_model import (
    DEFAULT_SCRIPT_IDS,
    EOS_ID,
    INCOMPLETE_UTF8_SCRIPT_IDS,
    decode_script,
    ensure_scripted_model,
)

pytestmark = pytest.mark.integration


def _serve(script: tuple[int, ...], workdir: Path) -> Iterator[ServerProcess]:
    srv = start_server(ensure_scripted_model(script), workdir, "--dtype", "float32")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(DEFAULT_SCRIPT_IDS, tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(INCOMPLETE_UTF8_SCRIPT_IDS, tmp_path_factory.mktemp("utf8"))


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _chat(server: ServerProcess, stream: bool, **extra: object) -> tuple[str, str | None, object]:
    client = _client(server)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(320, 240)}},
                {"type": "text", "text": "What is the weather like in the picture?"},
            ],
        }
    ]
    kwargs = {"model": server.model, "messages": messages, "temperature": 0, **extra}
    if not stream:
        out = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        return out.choices[0].message.content, out.choices[0].finish_reason, out.usage
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    ):  # type: ignore[call-overload]
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


@pytest.mark.parametrize("stream", [False, True])
def test_the_model_ends_the_answer_with_eos(scripted: ServerProcess, stream: bool) -> None:
    text, finish, usage = _chat(scripted, stream, max_tokens=200)
    assert text == decode_script(DEFAULT_SCRIPT_IDS)
    assert finish == "stop"
    assert usage.completion_tokens == len(DEFAULT_SCRIPT_IDS) + 1  # type: ignore[attr-defined]


def test_ignore_eos_and_max_tokens_still_end_with_length(scripted: ServerProcess) -> None:
    _, finish, usage = _chat(
        scripted, False, max_tokens=len(DEFAULT_SCRIPT_IDS) + 4, extra_body={"ignore_eos": True}
    )
    assert finish == "length" and usage.completion_tokens == len(DEFAULT_SCRIPT_IDS) + 4  # type: ignore[attr-defined]
    text, finish, _ = _chat(scripted, False, max_tokens=5)
    assert finish == "length" and text == decode_script(DEFAULT_SCRIPT_IDS[:5])


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_bans_and_forces_tokens(scripted: ServerProcess, stream: bool) -> None:
    """The script wins each step by about 64 logits: -100 takes a token out, +100 puts one in."""
    script = decode_script(DEFAULT_SCRIPT_IDS)
    extra = len(DEFAULT_SCRIPT_IDS) + 3
    # EOS banned: the script, then no end until max_tokens
    text, finish, usage = _chat(scripted, stream, max_tokens=extra, logit_bias={str(EOS_ID): -100})
    assert text.startswith(script) and len(text) > len(script) and finish == "length"
    assert usage.completion_tokens == extra  # type: ignore[attr-defined]
    # the first script token banned: the answer starts otherwise
    first = {str(DEFAULT_SCRIPT_IDS[0]): -100}
    text, _, _ = _chat(scripted, stream, max_tokens=1, logit_bias=first)
    assert text != decode_script(DEFAULT_SCRIPT_IDS[:1])
    # a token forced: every step, sampled or greedy
    forced = DEFAULT_SCRIPT_IDS[1]
    for temperature in (0, 1.0):
        text, finish, _ = _chat(
            scripted, stream, max_tokens=3, logit_bias={str(forced): 100}, temperature=temperature
        )
        assert text == decode_script((forced,) * 3) and finish == "length"


def test_logit_bias_reaches_every_choice_and_yields_to_the_grammar(scripted: ServerProcess) -> None:
    forced = {str(DEFAULT_SCRIPT_IDS[1]): 100}
    out = _client(scripted).chat.completions.create(
        model=scripted.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        n=2,
        temperature=1.0,
        logit_bias=forced,
    )
    assert [c.message.content for c in out.choices] == [
        decode_script(DEFAULT_SCRIPT_IDS[1:2] * 3)
    ] * 2
    # the grammar's mask comes after the bias: the forced token is refused where JSON forbids it
    # (the first token must open the object) and wins where JSON allows it (inside a key)
    text, _, _ = _chat(
        scripted, False, max_tokens=2, logit_bias=forced, response_format={"type": "json_object"}
    )
    bang = decode_script(DEFAULT_SCRIPT_IDS[1:2])
    assert text.startswith("{") and not text.startswith(bang) and text.endswith(bang)


def test_logit_bias_outside_the_vocabulary_is_a_400(scripted: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(scripted, False, max_tokens=1, logit_bias={"151936": -100})
    assert info.value.body["param"] == "logit_bias"  # type: ignore[index]
    assert "keys are token ids from 0 to 151935" in info.value.body["message"]  # type: ignore[index]


def test_a_prefix_cache_hit_gives_the_same_answer(scripted: ServerProcess) -> None:
    first = _chat(scripted, False, max_tokens=200)
    second = _chat(scripted, False, max_tokens=200)
    assert second[2].prompt_tokens_details.cached_tokens > 0  # type: ignore[attr-defined]
    assert second[:2] == first[:2] == (decode_script(DEFAULT_SCRIPT_IDS), "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_trailing_bytes_of_an_unfinished_character_are_flushed(
    incomplete: ServerProcess, stream: bool
) -> None:
    """The answer ends with the first byte of a 4-byte character, then EOS: the tokenizer
    decodes that to U+FFFD, and so must the response (dropping it loses what the model said)."""
    text, finish, _ = _chat(incomplete, stream, max_tokens=50)
    assert text == "ab\ufffd" == decode_script(INCOMPLETE_UTF8_SCRIPT_IDS)
    assert finish == "stop"
