"""The long-text lane: prompts with much text are bounded, then tokenized, on a thread of their
own, so a short request never waits behind them on the preprocessing thread.

Tokenizing runs at about 1 s per million characters on these cores. Before, four requests of
4 x 1M characters were each tokenized in full on the one preprocessing thread, then refused
by the context check, and a 1-token request waited 8.0 s behind them. Now:

1. A prompt whose text is provably too long is refused before any tokenizing. Every token of the
   vocabulary stands for at most ``max_token_bytes`` bytes (128 for Qwen's: 128 spaces), and a
   text's tokens together stand for its bytes after the tokenizer's normalizer (NFC for Qwen,
   which can shorten Hangul jamo or Greek with accents, so it is applied, except to ASCII,
   which no Unicode normal form changes). So a prompt has at least ``bytes / max_token_bytes``
   tokens: past the limit, no valid request is refused. The bound is weak for text made of
   runs of spaces and strong for ordinary prose (4-5 bytes a token).
2. Otherwise its texts are tokenized here with a tokenizer of this lane's own (Rust tokenizers
   are not shared across threads), one text at a time, and refused as soon as the tokens so
   far reach the limit. The preprocessing thread then splices the pieces in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from vlserve.engine.fields import PROMPT, about
from vlserve.engine.vocab import byte_decoder
from vlserve.errors import ContextLengthError

# Prompts with more text than this take the lane: about 65 ms of tokenizing.
LONG_TEXT_CHARS = 65_536
_UNICODE_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})  # each leaves ASCII unchanged


def text_chars(messages: Sequence[dict[str, Any]]) -> int:
    """The characters of a template message list's texts (string contents and text parts)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if p.get("type") == "text")
    return total


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A message text's ids: special-token strings in it stay plain text (preprocess.py)."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def max_token_bytes(tokenizer: Any) -> int:
    """The most bytes one token of ``tokenizer`` stands for. Byte-level tokens count a byte per
    character of the byte alphabet; added tokens, and characters outside that alphabet (other
    kinds of vocabulary), count their UTF-8 bytes, which can only overstate."""
    alphabet = byte_decoder()
    added = set(tokenizer.get_added_vocab())
    longest = 0
    for token in tokenizer.get_vocab():
        if len(token) * 4 <= longest:
            continue  # cannot beat it even at 4 bytes a character
        if token in added or not all(c in alphabet for c in token):
            size = len(token.encode("utf-8"))
        else:
            size = len(token)
        longest = max(longest, size)
    return max(longest, 1)


class LongTexts:
    """The lane's tokenizer and bound; used on the lane's thread only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)  # this thread's own
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._normalizer = getattr(backend, "normalizer", None)
        kind = type(self._normalizer).__name__ if self._normalizer is not None else None
        self._ascii_unchanged = kind is None or kind in _UNICODE_FORMS

    def normalized_bytes(self, text: str) -> int:
        if self._normalizer is None or (self._ascii_unchanged and text.isascii()):
            return len(text.encode("utf-8"))
        return len(self._normalizer.normalize_str(text).encode("utf-8"))

    def least_tokens(self, texts: Sequence[str]) -> tuple[int, int]:
        """(a lower bound on the tokens of ``texts``, their normalized bytes)."""
        size = sum(self.normalized_bytes(t) for t in texts)
        return -(-size // self.max_token_bytes), size

    def tokenize(self, texts: Sequence[str], limit: int, what: str) -> list[list[int]]:
        """Each text's ids; ``ContextLengthError`` as soon as they must reach ``limit`` tokens
        (``what`` names the limit in the message)."""
        least, size = self.least_tokens(texts)
        if least >= limit:
            raise about(
                PROMPT,
                ContextLengthError(
                    f"the prompt is at least {least} tokens ({size} bytes of text, and no token "
                    f"of this model stands for more than {self.max_token_bytes}), which leaves "
                    f"no room in {what}"
                ),
            )
        pieces: list[list[int]] = []
        total = 0
        for text in texts:
            pieces.append(encode_text(self.tokenizer, text))
            total += len(pieces[-1])
            if total >= limit:
                raise about(
                    PROMPT,
                    ContextLengthError(
                        f"the prompt's text is at least {total} tokens, which leaves no room in "
                        f"{what}"
                    ),
                )
        return pieces
