"""Incremental detokenization: exact concatenation, held-back partial characters and stop strings."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.simulated_kv import ByteDecoder
from vlserve.engine.detokenizer import IncrementalDetokenizer


def _run(
    text: str, stop: tuple[str, ...] = (), specials: bool = False
) -> tuple[str, list[str], bool]:
    ids = list(text.encode())
    if specials:
        ids = [t for i in ids for t in ((i, 1000) if i % 3 == 0 else (i,))]
    detok = IncrementalDetokenizer(ByteDecoder(), stop)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return "".join(deltas), deltas, detok.stopped


def test_multibyte_characters_are_never_split() -> None:
    text = "你好，世界 🎉 naïve"
    joined, deltas, _ = _run(text)
    assert joined == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[0] == ""  # the first byte of 你 alone is not a character yet


@given(st.text(max_size=60))
def test_concatenation_is_exact_for_any_text(text: str) -> None:
    assert _run(text)[0] == text
    assert _run(text, specials=True)[0] == text


def test_stop_string_truncates_and_stops() -> None:
    joined, _, stopped = _run("hello world, goodbye", stop=("world",))
    assert joined == "hello "
    assert stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    joined, _, _ = _run("abc STOP def END", stop=("END", "STOP"))
    assert joined == "abc "


def test_text_that_might_start_a_stop_string_is_held_then_released() -> None:
    detok = IncrementalDetokenizer(ByteDecoder(), ("xyz",))
    assert "".join(detok.add(b) for b in b"abxy") == "ab"  # "xy" could still become "xyz"
    assert detok.add(ord("!")) == "x"  # "y!" could not, but two characters are always held
    assert detok.flush() == "y!"
    assert not detok.stopped


def test_stop_string_spanning_a_multibyte_boundary() -> None:
    joined, _, stopped = _run("前面的文字停止后面", stop=("停止",))
    assert joined == "前面的文字" and stopped


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=4))
def test_stop_never_leaks_and_prefix_is_exact(text: str, stop: str) -> None:
    joined, _, stopped = _run(text, stop=(stop,))
    cut = text.find(stop)
    if cut >= 0:
        assert stopped and joined == text[:cut]
    else:
        assert not stopped and joined == text


def test_random_chunking_matches_real_tokenizer(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    vocab = tiny_tokenizer.vocab_size
    ids = [rng.randrange(vocab) for _ in range(300)]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    joined = "".join(detok.add(t) for t in ids) + detok.flush()
    assert joined == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_flush_releases_trailing_bytes_that_never_completed_a_character() -> None:
    """The answer ends with the first byte of a four-byte character: held back while more
    could come, then released as the tokenizer decodes it (U+FFFD), never dropped."""
    detok = IncrementalDetokenizer(ByteDecoder())
    assert "".join(detok.add(t) for t in [ord("a"), ord("b"), 0xF0]) == "ab"
    assert detok.flush() == "\ufffd"
    assert detok.text == "ab\ufffd" == ByteDecoder().decode([ord("a"), ord("b"), 0xF0])
