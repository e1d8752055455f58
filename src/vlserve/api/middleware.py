"""Every request's frame: request id, header and body limits, metrics, one log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlserve import tracecontext
from vlserve.aio import within
from vlserve.api.accesslog import log_line, request_fields
from vlserve.api.auth import ApiKeys, is_protected
from vlserve.api.errors import send_error
from vlserve.api.metrics import Metrics, RequestRecord
from vlserve.api.otel import RequestSpans
from vlserve.errors import (
    AuthenticationError,
    ClientTimeoutError,
    EngineUnavailableError,
    HeadersTooLargeError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    VLServeError,
)

log = logging.getLogger("vlserve.request")

MAX_REQUEST_ID_CHARS = 128
# Printable, no spaces, quotes, commas or semicolons: safe in headers and log lines, and wide
# enough for common id styles (UUIDs, base64, `vlserve bench`'s run-tag ids with @ and #).
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:@#/+=~-]")
_QUIET_PATHS = frozenset({"/health", "/metrics"})  # polled every few seconds: logged at DEBUG
_CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer"
# The only requests whose body is read; any other request that declares one is answered
# without reading it, and its connection closed.
BODY_ROUTES = frozenset({("POST", "/v1/chat/completions")})
_KNOWN_PATHS = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/docs",
        "/redoc",
        "/openapi.json",
    }
)


def request_id_from(value: bytes | None) -> str:
    """The client's ``x-request-id`` with unsafe characters dropped and capped, or a new one."""
    if value:
        cleaned = _UNSAFE_ID_CHARS.sub("", value.decode("latin-1"))[:MAX_REQUEST_ID_CHARS]
        if cleaned:
            return cleaned
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Outermost app layer (inside CORS): gives each request a record, checks its API key and
    enforces the limits.

    The body is read here, after the key check and only for ``BODY_ROUTES``, counting bytes as
    they arrive (Content-Length is not trusted, only used to refuse early) within
    ``body_timeout_s``, and replayed to the app; reading it all first costs nothing since the
    JSON parser needs all of it anyway. The bodies of all requests together are held to
    ``max_inflight_body_bytes`` from their first byte until their request ends: past it, 503
    with Retry-After (the server is busy, not the client too fast) and the connection closed.
    A request with both Content-Length and Transfer-Encoding is refused and its connection
    closed (RFC 9112 6.3: the shape of request smuggling).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        max_headers: int,
        max_header_bytes: int,
        keys: ApiKeys | None = None,
        body_timeout_s: float = 30.0,
        metrics_auth: bool = False,
        body_routes: frozenset[tuple[str, str]] = BODY_ROUTES,
        max_inflight_body_bytes: int | None = None,
        spans: RequestSpans | None = None,
    ) -> None:
        self.spans = spans  # each request exported as an OpenTelemetry span, when set
        self.app = app
        self.body_routes = body_routes
        self.keys = keys
        self.body_timeout_s = body_timeout_s
        self.metrics_auth = metrics_auth
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_inflight_body_bytes = max_inflight_body_bytes or 1 << 62
        self.inflight_body_bytes = 0  # held by all requests (event loop only: no lock)
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        record = RequestRecord(
            request_id=request_id_from(_header(headers, b"x-request-id")),
            method=scope["method"],
            path=scope["path"],
        )
        scope.setdefault("state", {})["record"] = record
        _trace(record, scope, self.spans is not None)
        id_header = (b"x-request-id", record.request_id.encode())
        started = completed = False
        held = [0]  # this request's share of inflight_body_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                rest = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*rest, id_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        try:
            target = scope.get("raw_path") or scope["path"].encode()
            line = len(scope["method"]) + len(target) + len(scope.get("query_string", b"")) + 12
            replay = await self._admit(headers, receive, record, line, held)
            if replay is not None:
                await self.app(scope, replay, send_with_id)
        except VLServeError as exc:  # refused before the app ran: its body, if any, is unread
            record.error_code = exc.code
            await send_error(send_with_id, exc, close=True)
        except Exception:
            log.exception("unhandled error in request %s", record.request_id)
            if started:
                raise  # the response is half sent: only closing the connection tells the client
            record.error_code = "internal_error"
            await send_error(send_with_id, VLServeError("internal server error"))
        finally:
            self.inflight_body_bytes -= held[0]
            if not completed:
                record.status = _CLIENT_CLOSED  # gone mid-answer, or cancelled at shutdown
            if record.status == _CLIENT_CLOSED and record.model and not record.finish_reason:
                record.finish_reason = "abort"
            self._finish(record)

    async def _admit(
        self,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        record: RequestRecord,
        request_line_bytes: int = 0,
        held: list[int] | None = None,
    ) -> Receive | None:
        """Check the request line and headers, and read the body under the cap: the app's
        receive(), or None if the client left; a refusal raises the exception tree's error."""
        if len(headers) > self.max_headers:
            message = f"more than {self.max_headers} request headers"
            raise HeadersTooLargeError(message, code="too_many_headers")
        # h11 caps only a head that arrives in pieces; one read whole is checked here, its
        # request line included (a 100 KB URL is refused, not answered 404 with itself)
        head = request_line_bytes + sum(len(k) + len(v) + 4 for k, v in headers)
        if head > self.max_header_bytes:
            raise HeadersTooLargeError(
                "the request line and headers exceed the server's limit of "
                f"{self.max_header_bytes} bytes"
            )
        if _header(headers, b"transfer-encoding") is not None and (
            _header(headers, b"content-length") is not None
        ):
            message = "a request may not carry both Content-Length and Transfer-Encoding"
            raise InvalidRequestError(message, code="ambiguous_length")
        # Keys before the body: an unauthenticated client never makes the server buffer it.
        if self.keys and is_protected(record.path, metrics=self.metrics_auth):
            authorization = _header(headers, b"authorization")
            record.api_key_index = self.keys.identify(authorization)
            if record.api_key_index is None:
                raise AuthenticationError(
                    "missing API key: send 'Authorization: Bearer <key>'"
                    if authorization is None
                    else "invalid API key"
                )
        declared = _header(headers, b"content-length")
        has_body = _header(headers, b"transfer-encoding") is not None or declared not in (
            None,
            b"0",
        )
        if (record.method, record.path) not in self.body_routes:
            if not has_body:
                return receive
            # never read: answered at once, and the connection closed (its body is unread)
            known = record.path in _KNOWN_PATHS
            what = "method_not_allowed" if known else "not_found"
            message = f"{record.method} {record.path} takes no request body here ({what})"
            raise MethodNotAllowedError(message) if known else NotFoundError(message, code=what)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                event = await within(receive(), deadline - time.monotonic())  # past: 0 s
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11
                message = f"request body not received within {self.body_timeout_s:g} s"
                raise ClientTimeoutError(message) from None
            if event["type"] == "http.disconnect":
                return None
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            if self.inflight_body_bytes + len(chunk) > self.max_inflight_body_bytes:
                message = (
                    "the server holds its limit of request bodies being read and served "
                    "(--max-inflight-body-mb); retry shortly"
                )
                raise EngineUnavailableError(message, retry_after_s=1, code="server_busy")
            self.inflight_body_bytes += len(chunk)
            if held is not None:
                held[0] += len(chunk)
            chunks.append(chunk)
            if not event.get("more_body", False):
                break
        return _replay(b"".join(chunks), receive)

    def _too_large(self) -> PayloadTooLargeError:
        limit = self.max_body_bytes
        return PayloadTooLargeError(f"request body exceeds the server's limit of {limit} bytes")

    def _finish(self, record: RequestRecord) -> None:
        e2e_s = time.perf_counter() - record.start
        self.metrics.observe(record, e2e_s)
        if self.spans is not None and record.path not in _QUIET_PATHS:
            self.spans.export(record, e2e_s)
        level = logging.DEBUG if record.path in _QUIET_PATHS else logging.INFO
        if log.isEnabledFor(level):
            extra = {"fields": request_fields(record, e2e_s), "event": "request"}
            log.log(level, "%s", log_line(record, e2e_s), extra=extra)


def _trace(record: RequestRecord, scope: Scope, sample_roots: bool) -> None:
    """The client's address and W3C trace context on the record; this request's span becomes
    the current one, so the requests it makes (media fetches) carry it on. ``sample_roots``:
    a trace begun here is sampled (this server exports its spans)."""
    client = scope.get("client")
    if client:
        record.client = f"{client[0]}:{client[1]}"
    incoming = tracecontext.TraceParent.parse(_header(scope["headers"], b"traceparent"))
    span = incoming.child() if incoming is not None else tracecontext.TraceParent.new(sample_roots)
    record.trace_id, record.span_id, record.sampled = span.trace_id, span.parent_id, span.sampled
    record.traceparent = incoming.header() if incoming is not None else None
    tracecontext.current.set(span)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that first hands out the buffered body, then defers to the real one
    (which later reports the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
