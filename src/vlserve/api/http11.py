"""uvicorn's h11 protocol with OpenAI-shaped answers to requests it cannot parse (400, 431)."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlserve.api.errors import error_body

DEFAULT_LIMIT = 16 * 1024  # h11's own default


class OpenAIErrorH11Protocol(H11Protocol):
    """h11 refuses oversized header blocks (``h11_max_incomplete_event_size``) and malformed
    requests before any app code runs; uvicorn answers those with a plain-text 400. This
    answers 431 for headers over the limit and 400 otherwise, both as OpenAI error bodies."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_LIMIT
        too_big = len(self.conn.trailing_data[0]) > limit
        status = 431 if too_big else 400
        message = (
            f"request headers exceed the server's limit of {limit} bytes"
            if too_big
            else "invalid HTTP request"
        )
        code = "headers_too_large" if too_big else "invalid_http_request"
        body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = b"Request Header Fields Too Large" if too_big else b"Bad Request"
        for event in (
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
