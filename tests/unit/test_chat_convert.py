"""Messages → template inputs, and request fields → sampling parameters."""

from __future__ import annotations

import pytest

from vlserve.api.chat import MediaRef, attach_media, split_messages
from vlserve.api.convert import SamplingDefaults, check_supported, stop_strings, to_sampling
from vlserve.api.protocol import ChatCompletionRequest
from vlserve.errors import InvalidRequestError


def _img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_every_turn_and_part_kept_in_order() -> None:
    messages = [
        {"role": "developer", "content": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                _img("u1"),
                _img("u2"),
                {"type": "text", "text": "b"},
            ],
        },
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": [_img("u3")]},
    ]
    template, refs = split_messages(messages)
    assert [r.url for r in refs] == ["u1", "u2", "u3"]
    assert [m["role"] for m in template] == ["system", "user", "assistant", "user"]
    assert template[1]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "image", "index": 0},
        {"type": "image", "index": 1},
        {"type": "text", "text": "b"},
    ]
    assert refs[2] == MediaRef("image", "u3", "messages[3].content[0].image_url")
    parts = [{"type": "image", "image": name} for name in ("I1", "I2", "I3")]
    attached = attach_media(template, parts)
    assert attached[1]["content"][2] == {"type": "image", "image": "I2"}
    assert attached[3]["content"] == [{"type": "image", "image": "I3"}]
    assert template[3]["content"][0]["index"] == 2  # input untouched


@pytest.mark.parametrize("role", ["system", "assistant"])
def test_images_only_in_user_messages(role: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        split_messages([{"role": role, "content": [_img("u")]}])
    assert info.value.param == "messages[0].content[0]"


def test_unknown_role_and_part_type() -> None:
    with pytest.raises(InvalidRequestError, match="role"):
        split_messages([{"role": "function", "content": "x"}])
    with pytest.raises(InvalidRequestError) as info:
        split_messages([{"role": "user", "content": [{"type": "input_audio"}]}])
    assert info.value.param == "messages[0].content[0].type"


def _req(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def _sp(req: ChatCompletionRequest, defaults: SamplingDefaults | None = None):  # type: ignore[no-untyped-def]
    return to_sampling(req, defaults or SamplingDefaults(), vocab_size=1000)


def test_defaults_from_generation_config_apply_only_when_absent() -> None:
    class Gen:
        do_sample = True
        temperature = 0.7
        top_p = 0.8
        top_k = 20
        repetition_penalty = 1.05
        min_p = None

    d = SamplingDefaults.from_generation_config(Gen())
    sp = _sp(_req(), d)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert sp.max_tokens is None  # the engine fits it to the prompt and the server's default
    sp = _sp(_req(temperature=0, top_k=-1, max_tokens=5), d)
    assert sp.temperature == 0 and sp.top_k == 0 and sp.max_tokens == 5
    assert SamplingDefaults.from_generation_config(None).temperature == 1.0


def test_max_tokens_limits() -> None:
    assert _sp(_req(max_completion_tokens=7)).max_tokens == 7
    assert _sp(_req(max_tokens=9)).max_tokens == 9
    with pytest.raises(InvalidRequestError):
        check_supported(_req(max_tokens=3, max_completion_tokens=4))


def test_stop_and_stop_token_ids() -> None:
    assert stop_strings("x") == ("x",)
    assert stop_strings(["a", "", "b"]) == ("a", "b")
    with pytest.raises(InvalidRequestError):
        stop_strings(["s"] * 17)
    sp = _sp(_req(stop_token_ids=[5, 6], ignore_eos=True, seed=3))
    assert sp.stop_token_ids == (5, 6) and sp.ignore_eos and sp.seed == 3
    with pytest.raises(InvalidRequestError) as info:
        _sp(_req(stop_token_ids=[1000]))
    assert info.value.param == "stop_token_ids"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),  # above max_n=2
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_unsupported_values_are_refused_by_name(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_supported(_req(**fields), max_n=2)
    assert info.value.param == param


def test_logit_bias_reaches_the_sampling_params_as_sorted_pairs() -> None:
    sp = _sp(_req(logit_bias={"999": -100, "0": 100.0, "7": 0.5}))
    assert sp.logit_bias == ((0, 100.0), (7, 0.5), (999, -100.0))
    assert _sp(_req()).logit_bias == () and _sp(_req(logit_bias={})).logit_bias == ()


@pytest.mark.parametrize(
    ("bias", "words"),
    [
        ({"1000": 1.0}, "Invalid key in 'logit_bias': '1000'; keys are token ids from 0 to 999"),
        ({"-1": 1.0}, "'-1'"),
        ({"007": 1.0}, "'007'"),  # "7" and "007" would name one token
        ({"1e2": 1.0}, "'1e2'"),
        ({"٣": 1.0}, "keys are token ids"),  # a digit, but not ASCII
        ({"9" * 5000: 1.0}, "..."),  # no int() of thousands of digits
        ({"5": 100.5}, "Invalid value in 'logit_bias' for token 5: 100.5; biases are from -100"),
        ({"5": -101}, "for token 5: -101"),
    ],
)
def test_bad_logit_bias_is_a_400_naming_it(bias: dict, words: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _sp(_req(logit_bias=bias))
    assert info.value.param == "logit_bias" and words in info.value.message


def test_logit_bias_entries_nan_and_types_are_checked_by_the_schema() -> None:
    from pydantic import ValidationError

    _req(logit_bias={str(i): 1.0 for i in range(300)})  # OpenAI's limit
    for bad in ({str(i): 1.0 for i in range(301)}, {"1": float("nan")}, {"1": "2"}, [1, 2]):
        with pytest.raises(ValidationError):
            _req(logit_bias=bad)


def test_n_logprobs_and_formats_reach_the_sampling_params() -> None:
    check_supported(_req(n=2, logprobs=True, top_logprobs=5), max_n=2)
    sp = _sp(_req(n=2, logprobs=True, top_logprobs=5, seed=1))
    assert (sp.n, sp.logprobs, sp.seed) == (2, 5, 1)
    assert _sp(_req(logprobs=True)).logprobs == 0
    assert _sp(_req(logprobs=False, top_logprobs=None)).logprobs is None


def test_harmless_values_are_accepted() -> None:
    check_supported(
        _req(
            n=1,
            logprobs=False,
            response_format={"type": "text"},
            tools=[],
            tool_choice="none",
            user="u",
            store=False,
            metadata={"k": "v"},
            service_tier="auto",
            prompt_cache_key="conversation-1",
            safety_identifier="user-hash",
        )
    )


def _vid(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def test_videos_and_images_share_one_placeholder_list_in_prompt_order() -> None:
    messages = [
        {"role": "user", "content": [_vid("v1"), {"type": "text", "text": "and"}, _img("i1")]},
        {"role": "tool", "content": [_img("i2"), _vid("v2")], "tool_call_id": "c"},
    ]
    template, refs = split_messages(messages)
    assert [(r.kind, r.url) for r in refs] == [
        ("video", "v1"),
        ("image", "i1"),
        ("image", "i2"),
        ("video", "v2"),
    ]
    assert refs[0].param == "messages[0].content[0].video_url"
    assert refs[3].param == "messages[1].content[1].video_url"
    assert template[0]["content"][0] == {"type": "video", "index": 0}
    assert template[1]["content"] == [{"type": "image", "index": 2}, {"type": "video", "index": 3}]
    parts = [{"type": r.kind, r.kind: r.url.upper()} for r in refs]
    attached = attach_media(template, parts)
    assert attached[0]["content"] == [
        {"type": "video", "video": "V1"},
        {"type": "text", "text": "and"},
        {"type": "image", "image": "I1"},
    ]
    assert attached[1]["content"][1] == {"type": "video", "video": "V2"}


@pytest.mark.parametrize("role", ["system", "assistant"])
def test_videos_only_in_user_and_tool_messages(role: str) -> None:
    with pytest.raises(InvalidRequestError, match="videos are only allowed") as info:
        split_messages([{"role": role, "content": [_vid("v")]}])
    assert info.value.param == "messages[0].content[0]"


def test_video_parts_validate_like_image_parts() -> None:
    request = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": [_vid("data:video/mp4;base64,AAAA"), _img("u")]}],
    )
    dumped = request.model_dump(exclude_none=True)["messages"][0]["content"]
    assert dumped[0] == {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    with pytest.raises(ValueError):
        ChatCompletionRequest(
            model="m",
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}],
        )
