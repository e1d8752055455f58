"""The one mapping from exceptions to OpenAI error bodies, and FastAPI's handlers for it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from vlserve.errors import (
    AuthenticationError,
    HeadersTooLargeError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    VLServeError,
)

log = logging.getLogger(__name__)

# What FastAPI and Starlette raise themselves, as the exception tree's errors.
_HTTP_ERRORS: dict[int, tuple[type[VLServeError], str]] = {
    400: (InvalidRequestError, "invalid_json"),  # FastAPI's only one: an unparsable body
    404: (NotFoundError, "not_found"),
    405: (MethodNotAllowedError, "method_not_allowed"),
    413: (PayloadTooLargeError, "payload_too_large"),
    431: (HeadersTooLargeError, "headers_too_large"),
}
_UNPARSABLE = (
    "the request body could not be parsed as JSON (invalid UTF-8, a number too long to parse, "
    "or nesting too deep)"
)


def body_for(exc: VLServeError) -> dict[str, Any]:
    """OpenAI's error body for ``exc``."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def headers_for(exc: VLServeError) -> dict[str, str]:
    """The headers an error's answer carries besides its body."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def from_http(status: int, detail: Any) -> VLServeError:
    """FastAPI's or Starlette's ``HTTPException`` as the exception tree's error."""
    cls, code = _HTTP_ERRORS.get(status, (VLServeError, f"http_{status}"))
    exc = cls(_UNPARSABLE if code == "invalid_json" else str(detail), code=code)
    exc.status = status  # the same for every class above; an unlisted status keeps its own
    return exc


async def send_error(send: Send, exc: VLServeError, *, close: bool = False) -> None:
    """Answer from an ASGI middleware (before any route runs) with ``exc``'s error body;
    ``close``: the connection closes after it (a body left unread, or a client cut off)."""
    body = json.dumps(body_for(exc)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers_for(exc).items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def response_for(exc: VLServeError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        body_for(exc), status_code=exc.status, headers={**headers_for(exc), **(headers or {})}
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_PART_TAGS = {
    "text",
    "image_url",
    "video_url",
}  # discriminator values pydantic puts after a list index
# discriminator values and union members pydantic puts after a field name
_FIELD_TAGS = {"response_format": {"text", "json_object", "json_schema"}}
_MODEL_TAGS = {"NamedToolChoice"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')
    → 'messages[0].content[1].image_url.url': field names only, union tags dropped."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (
            part == "body"
            or "[" in part
            or part in _TYPE_TAGS
            or part.startswith("constrained-")  # a union member with Field bounds
            or part in _MODEL_TAGS
            or (isinstance(prev, int) and part in _PART_TAGS)
            or part in _FIELD_TAGS.get(prev, ())
        ):
            out += f".{part}" if out else part
        prev = part
    return out or None


def validation_error(exc: RequestValidationError) -> JSONResponse:
    # Of a union's several failures, the deepest one says what is wrong; at equal depth, a
    # broken limit ("at most 16 items") says more than a branch of another type.
    errors = sorted(
        exc.errors(),
        key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")),
        reverse=True,
    )
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = tuple(first.get("loc", ()))
    param = _loc_to_param(loc)
    code = "invalid_value"
    if first.get("type") == "json_invalid":  # loc is ("body", character offset)
        param, code = None, "invalid_json"
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        message = f"request body is not valid JSON: {reason}{at}"
    elif first.get("type") == "extra_forbidden":
        message = f"unsupported parameter: {param}"
    elif param is None:  # the body itself is of the wrong shape (an array, a string...)
        message = f"request body is not valid JSON for this endpoint: {first.get('msg')}"
    else:
        message = f"{param}: {first.get('msg')}"
    return response_for(InvalidRequestError(message, param=param, code=code))


def _note(request: Request, code: str) -> None:
    """Put the error's code on the request's record (for the request log line)."""
    record = getattr(request.state, "record", None)
    if record is not None:
        record.error_code = code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VLServeError)
    async def _vlserve(request: Request, exc: VLServeError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        _note(request, exc.code or exc.type)
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _note(request, "invalid_value")
        return validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = from_http(exc.status_code, exc.detail)
        _note(request, error.code)
        return response_for(error, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return response_for(VLServeError("internal server error"))
