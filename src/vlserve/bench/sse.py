"""The one incremental parser for server-sent events (``text/event-stream``) used by the client."""

from __future__ import annotations

from typing import NamedTuple

DONE = "[DONE]"


class SSEEvent(NamedTuple):
    """One dispatched event: its ``event:`` name ("message" when absent) and joined ``data:``."""

    data: str
    event: str = "message"


class SSEParser:
    """Feed raw bytes as they arrive; get complete events back.

    Follows the WHATWG event-stream rules where servers differ in practice: lines may end in
    ``\\n``, ``\\r\\n`` or ``\\r``; a line (or a UTF-8 character) may be split across reads;
    ``:`` lines are comments/keep-alives; several ``data:`` lines join with ``\\n``. Unlike the
    spec, :meth:`close` dispatches a last event that lacks its blank line, because some servers
    end the stream right after the final ``data:`` line and never send ``[DONE]``.
    """

    __slots__ = ("_tail", "_skip_lf")

    def __init__(self) -> None:
        self._tail = b""  # everything after the last blank line: an event still arriving
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completes (possibly none)."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the \n of a \r\n split across two reads
        self._skip_lf = False
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._tail + chunk if self._tail else chunk
        if b"\n\n" not in buf:
            self._tail = buf
            return []
        blocks = buf.split(b"\n\n")
        self._tail = blocks.pop()
        events = []
        for block in blocks:
            # Fast path, nearly every event of an OpenAI-style stream: one "data: " line.
            if block[:6] == b"data: " and b"\n" not in block:
                events.append(SSEEvent(block[6:].decode("utf-8", "replace")))
            else:
                event = _parse_block(block)
                if event is not None:
                    events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: return any event left without its terminating blank line."""
        tail, self._tail = self._tail, b""
        event = _parse_block(tail) if tail else None
        return [] if event is None else [event]


def _parse_block(block: bytes) -> SSEEvent | None:
    """The lines between two blank lines → one event, or None when it carries no data."""
    data: list[bytes] = []
    name = b""
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # empty, or ":" comment / keep-alive
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
        # "id" and "retry" only matter for reconnecting, which a benchmark never does.
    if not data:
        return None
    text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
    return SSEEvent(text, name.decode("utf-8", "replace") if name else "message")
