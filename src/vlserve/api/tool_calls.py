"""Tool calls in model text, parsed as the text streams: Qwen3-VL's (Hermes-style) format.

The model writes a call as ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``.
``ToolCallParser.feed`` takes text deltas and returns pieces: plain ``Content``, a ``CallStart``
(index, id, name) once a call's name is known, then ``CallArguments`` fragments as they arrive.

Invariants:
- No text of a tag ever reaches ``Content``: a tail that could still grow into ``<tool_call>``
  is held back until it cannot. Whitespace is held back too: whitespace next to a call (the
  newlines around and between tags) is dropped, so the content is the same streamed or not.
- A call's fragments concatenate to the raw ``arguments`` value the model wrote (the object's
  closing brace and whitespace held back until the call ends), so a streamed call reassembles to
  exactly the non-streamed one: both are built from the same pieces.
- A block whose head is not ``{"name": "...", "arguments": `` (keys in another order, say) is
  parsed whole at ``</tool_call>``; a block that is not a call at all stays content, tags
  included. A call cut short by ``max_tokens`` keeps the fragments it has.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

START, END = "<tool_call>", "</tool_call>"
# the head of a call up to its arguments' first character (not yet consumed)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}?\s*$")  # what may close the call object after its arguments


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Piece = Content | CallStart | CallArguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallParser:
    """Incremental; one per choice. ``calls`` counts the calls started so far."""

    def __init__(self) -> None:
        self._buf = ""
        self._state = "text"  # text | head (inside a tag, name unknown) | args
        self._sent = 0  # characters of the current call's arguments already returned
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            before = (self._state, len(self._buf))
            out.extend(self._advance())
            if (self._state, len(self._buf)) == before:
                return out

    def finish(self) -> list[Piece]:
        """The rest, once the text has ended."""
        out = self.feed("")
        if self._state == "text" and self._buf and not (self.calls and self._buf.isspace()):
            out.append(Content(self._buf))
        elif self._state == "head":
            out.append(Content(START + self._buf))
        elif self._state == "args" and len(self._buf) > self._sent:
            out.append(CallArguments(self.calls - 1, self._buf[self._sent :]))
        self._buf = ""
        self._state = "text"
        return out

    def _advance(self) -> list[Piece]:
        if self._state == "text":
            at = self._buf.find(START)
            if at < 0:
                keep = _partial_suffix(self._buf, START)
                text = self._buf[: len(self._buf) - keep]
                text = text[: len(text.rstrip())]  # trailing whitespace waits for what follows
                self._buf = self._buf[len(text) :]
                return [Content(text)] if text else []
            text, self._buf = self._buf[:at].rstrip(), self._buf[at + len(START) :]
            self._state = "head"
            return [Content(text)] if text else []
        if self._state == "head":
            return self._head()
        return self._arguments()

    def _head(self) -> list[Piece]:
        match = _HEAD.match(self._buf)
        if match is not None:
            name = json.loads(f'"{match.group(1)}"')
            self._buf = self._buf[match.end() :]
            self._state, self._sent = "args", 0
            self.calls += 1
            return [CallStart(self.calls - 1, new_call_id(), name)]
        end = self._buf.find(END)
        if end < 0:
            return []
        block, self._buf = self._buf[:end], self._buf[end + len(END) :]
        self._state = "text"
        return self._whole(block)

    def _whole(self, block: str) -> list[Piece]:
        """A complete block the streaming head did not recognise: a call, or plain content."""
        try:
            call = json.loads(block)
        except ValueError:
            call = None
        if not (
            isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call
        ):
            return [Content(START + block + END)]
        arguments = call["arguments"]
        text = (
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
        self.calls += 1
        index = self.calls - 1
        return [CallStart(index, new_call_id(), call["name"]), CallArguments(index, text)]

    def _arguments(self) -> list[Piece]:
        end = self._buf.find(END)
        body = self._buf if end < 0 else self._buf[:end]
        if end < 0:
            body = body[: len(body) - _partial_suffix(body, END)]
        safe = _TAIL.search(body).start()  # type: ignore[union-attr]  # always matches
        out: list[Piece] = []
        if safe > self._sent:
            out.append(CallArguments(self.calls - 1, body[self._sent : safe]))
            self._sent = safe
        if end >= 0:
            self._buf = self._buf[end + len(END) :]
            self._state = "text"
        return out
