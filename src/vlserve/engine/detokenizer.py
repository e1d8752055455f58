"""Incremental detokenization with stop strings: token ids in, final text deltas out."""

from __future__ import annotations

from typing import Protocol

# A window of already-final tokens re-decoded with each new token, so that byte-level merges
# at the boundary (a multi-byte character split over tokens) decode exactly as in one piece.
_PREFIX_WINDOW = 6
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is exact.

    Text is released only when it can no longer change: incomplete UTF-8 sequences (decoded as
    U+FFFD at the end) and any tail that could still grow into a stop string are held back.
    ``add`` returns the newly releasable text and whether a stop string was hit (the stop string
    itself and everything after it are never released, as in OpenAI's API).
    """

    def __init__(self, decoder: Decoder, stop: tuple[str, ...] = ()) -> None:
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the re-decoded window
        self._read_offset = 0  # tokens before this are in self._text
        self._text = ""  # all text decoded so far
        self._released = 0  # characters of self._text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._text[: self._released]

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an incomplete character, or a special token that decodes to nothing
        self._text += full[len(prefix) :]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PREFIX_WINDOW, 0)
        return self._release(final=False)

    def flush(self) -> str:
        """Release what was held back; call once the request has finished."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):  # trailing bytes that never completed a character
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._text += self._decode(self._ids[self._prefix_offset :])[len(prefix) :]
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self._stop:
            # Search only where a stop string could start that was not searched before.
            start = max(self._released - self._hold, 0)
            hits = [i for s in self._stop if (i := self._text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                self._text = self._text[: min(hits)]
                delta = self._text[self._released :]
                self._released = len(self._text)
                return delta
        end = len(self._text) if final else max(len(self._text) - self._hold, self._released)
        delta = self._text[self._released : end]
        self._released = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._decoder.decode(ids, skip_special_tokens=True)
