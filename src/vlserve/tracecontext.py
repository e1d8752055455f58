"""W3C Trace Context (https://www.w3.org/TR/trace-context/): a request's ``traceparent``, parsed
strictly, and the one this server's hop passes on to the requests it makes (media fetches)."""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

# version-trace_id-parent_id-flags, lower-case hex; a later version may append "-…" fields
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
MAX_TRACEPARENT_CHARS = 512


@dataclass(frozen=True)
class TraceParent:
    trace_id: str  # 32 hex digits, not all zero
    parent_id: str  # 16 hex digits, not all zero: the span of whoever sent this header
    flags: str  # 2 hex digits (01: sampled)

    @classmethod
    def parse(cls, value: str | bytes | None) -> TraceParent | None:
        """The header's context, or None when it is absent or malformed (the spec: ignore it
        and start a new trace)."""
        if value is None or len(value) > MAX_TRACEPARENT_CHARS:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        m = _TRACEPARENT.fullmatch(text.strip())
        if m is None:
            return None
        version, trace_id, parent_id, flags, rest = m.groups()
        if version == "ff" or (version == "00" and rest is not None):
            return None
        if trace_id == "0" * 32 or parent_id == "0" * 16:
            return None
        return cls(trace_id, parent_id, flags)

    @classmethod
    def new(cls, sampled: bool = False) -> TraceParent:
        """The root of a new trace; sampled when this server records it (OpenTelemetry export
        on), else not: nothing upstream asked for it."""
        return cls(secrets.token_hex(16), secrets.token_hex(8), "01" if sampled else "00")

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    def child(self) -> TraceParent:
        """This server's span in the same trace: what it sends on as its requests' parent."""
        return TraceParent(self.trace_id, secrets.token_hex(8), self.flags)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


# The current request's span; asyncio tasks the request starts (media fetches) inherit it.
current: ContextVar[TraceParent | None] = ContextVar("vlserve_traceparent", default=None)
