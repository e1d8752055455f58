"""uvicorn's h11 protocol with OpenAI-shaped answers to requests it cannot parse (400, 431)."""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlserve.api.errors import body_for
from vlserve.errors import (
    ClientTimeoutError,
    HeadersTooLargeError,
    InvalidRequestError,
    VLServeError,
)

DEFAULT_LIMIT = 16 * 1024  # h11's own default


class OpenAIErrorH11Protocol(H11Protocol):
    """h11 refuses oversized header blocks (``h11_max_incomplete_event_size``) and malformed
    requests before any app code runs; uvicorn answers those with a plain-text 400. This
    answers 431 for headers over the limit and 400 otherwise, both as OpenAI error bodies."""

    header_timeout_s: float | None = None  # set by with_header_timeout()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        self._watch_headers()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request line and headers are complete
            self._stop_watching()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Start the header clock when the server waits for a request's head (a new connection,
        or bytes of the next request on a kept-alive one); uvicorn itself only times idle
        kept-alive connections, so a client dripping header bytes was kept forever."""
        if (
            self.header_timeout_s is not None
            and self._header_timer is None
            and self.conn.their_state is h11.IDLE
        ):
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_watching(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # still answering the previous request; its response restarts nothing
        message = f"request headers not received within {self.header_timeout_s:g} s"
        self._send_error(ClientTimeoutError(message, code="header_timeout"), b"Request Timeout")

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_LIMIT
        if len(self.conn.trailing_data[0]) > limit:
            message = f"request headers exceed the server's limit of {limit} bytes"
            self._send_error(HeadersTooLargeError(message), b"Request Header Fields Too Large")
        else:
            error = InvalidRequestError("invalid HTTP request", code="invalid_http_request")
            self._send_error(error, b"Bad Request")

    def _send_error(self, exc: VLServeError, reason: bytes) -> None:
        """``exc``'s OpenAI error body, written raw onto the socket (h11 may be in an error
        state, or have no request to answer), then close."""
        body = json.dumps(body_for(exc)).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (exc.status, reason, len(body))
        )
        self.transport.write(head + body)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[OpenAIErrorH11Protocol]:
    """The protocol class for uvicorn, closing connections whose request head is late."""
    return type("TimedH11Protocol", (OpenAIErrorH11Protocol,), {"header_timeout_s": seconds})
