"""The long-text lane's bound (engine/long_text.py): never above a prompt's real token count,
and a prompt past it is refused before its text is tokenized."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlserve.engine.long_text import LongTexts, encode_text, max_token_bytes, text_chars
from vlserve.errors import ContextLengthError


@pytest.fixture(scope="module")
def lane(tiny_tokenizer):  # type: ignore[no-untyped-def]
    return LongTexts(tiny_tokenizer)


def test_the_longest_token_of_qwens_vocabulary_is_128_bytes(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert max_token_bytes(tiny_tokenizer) == 128  # 128 spaces


HANGUL_JAMO = unicodedata.normalize("NFD", "한국어 텍스트") * 300  # NFC makes it a third
GREEK = unicodedata.normalize("NFD", "ᾂᾃᾄ ἄλφα") * 300


@pytest.mark.parametrize(
    "text",
    [" " * 5000, "=" * 5000, "-" * 3000, "hello world " * 400, HANGUL_JAMO, GREEK, "😀" * 500,
     "中文文本" * 400, "\n" * 2000, "<|im_end|>" * 200, "a" * 9999],
)  # fmt: skip
def test_the_bound_is_never_above_the_tokens(lane: LongTexts, text: str) -> None:
    least, _ = lane.least_tokens([text])
    assert least <= len(encode_text(lane.tokenizer, text))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=3))
def test_the_bound_holds_for_any_text(lane: LongTexts, texts: list[str]) -> None:
    least, _ = lane.least_tokens(texts)
    assert least <= sum(len(encode_text(lane.tokenizer, t)) for t in texts)


def test_past_the_bound_nothing_is_tokenized(lane: LongTexts) -> None:
    class Untouchable:
        def encode(self, *args: object, **kwargs: object) -> list[int]:
            raise AssertionError("tokenized a prompt the bound refuses")

    refusing = LongTexts.__new__(LongTexts)
    refusing.__dict__.update(lane.__dict__, tokenizer=Untouchable())
    with pytest.raises(ContextLengthError) as info:
        refusing.tokenize(["a" * 1_000_000], 4096, "the model's context of 4096 tokens")
    assert info.value.param == "messages" and "at least 7813 tokens" in info.value.message


def test_tokens_past_the_limit_stop_the_lane_and_fit_ones_are_the_pieces(lane: LongTexts) -> None:
    texts = ["word " * 2000, "more " * 2000]  # about 2000 tokens each, bound far below
    with pytest.raises(ContextLengthError, match="at least"):
        lane.tokenize(texts, 3000, "the model's context of 3000 tokens")
    pieces = lane.tokenize(texts, 100_000, "x")
    assert pieces == [encode_text(lane.tokenizer, t) for t in texts]


def test_text_chars_counts_strings_and_text_parts() -> None:
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image"}]},
        {"role": "assistant", "content": None},
    ]
    assert text_chars(messages) == 5
