"""Token bytes for logprobs: byte-level pieces map back to raw bytes, added tokens to their text."""

from __future__ import annotations

from typing import Any

from vlserve.engine.vocab import TokenBytes


def test_token_bytes_rebuild_the_text(tiny_tokenizer: Any) -> None:
    table = TokenBytes(tiny_tokenizer, 151_936)
    text = "Hello 你好 wörld\n<tool_call>😀"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(table.bytes_of(i) for i in ids).decode() == text
    assert table.bytes_of(151657) == b"<tool_call>"
    assert table.bytes_of(151935) == b"" and table.bytes_of(10**7) == b""
    partial = [i for i in ids if table.text_of(i) != table.bytes_of(i).decode("utf-8", "ignore")]
    assert all("\ufffd" in table.text_of(i) for i in partial)  # pieces of one character
    lp = table.logprob(ids[0], -0.5, [ids[0], 151657], [-0.5, -2.0])
    assert (lp.token, lp.bytes, lp.top[1].token) == ("Hello", b"Hello", "<tool_call>")
