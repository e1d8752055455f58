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

    __slots__ = ("_tail", "_data", "_event", "_skip_lf")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._event = b""
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completes (possibly none)."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the \n of a \r\n split across two reads
        self._skip_lf = False
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        return self._lines(lines)

    def close(self) -> list[SSEEvent]:
        """End of stream: return any event left without its terminating blank line."""
        tail, self._tail = self._tail, b""
        events = self._lines([tail]) if tail else []
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line[0] == 0x3A:  # ":" starts a comment or keep-alive
                continue
            else:
                field, sep, value = line.partition(b":")
                if sep and value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    self._data.append(value)
                elif field == b"event":
                    self._event = value
                # "id" and "retry" only matter for reconnecting, which a benchmark never does.
        return events

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = b""
            return None
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        name = self._event.decode("utf-8", "replace") if self._event else "message"
        self._data = []
        self._event = b""
        return SSEEvent(data.decode("utf-8", "replace"), name)
