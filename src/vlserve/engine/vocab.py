"""Each token id's bytes, for logprobs (``token`` and ``bytes`` in OpenAI's shape)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from vlserve.engine.request import TokenLogprob, TopLogprob


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """``bytes_of(id)``: what a token stands for in the output, built once from the vocabulary.

    Byte-level BPE tokens map back through the byte alphabet; added tokens (``<tool_call>``)
    are their own UTF-8 text; ids past the tokenizer (the model's padding rows) are empty.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        decoder = byte_decoder()
        table: list[bytes] = [b""] * vocab_size
        added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        for piece, token_id in tokenizer.get_vocab().items():
            if not 0 <= token_id < vocab_size:
                continue
            if token_id in added or any(ch not in decoder for ch in piece):
                table[token_id] = piece.encode("utf-8")
            else:
                table[token_id] = bytes(decoder[ch] for ch in piece)
        self._table = table

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def bytes_of(self, token_id: int) -> bytes:
        return self._table[token_id] if 0 <= token_id < len(self._table) else b""

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def logprob(
        self, token_id: int, logprob: float, top_ids: list[int], top_values: list[float]
    ) -> TokenLogprob:
        top = tuple(
            TopLogprob(self.text_of(t), self.bytes_of(t), v)
            for t, v in zip(top_ids, top_values, strict=True)
        )
        return TokenLogprob(self.text_of(token_id), self.bytes_of(token_id), logprob, top)
