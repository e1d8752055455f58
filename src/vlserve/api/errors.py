"""The one mapping from exceptions to OpenAI error bodies, and FastAPI's handlers for it."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from vlserve.errors import EngineUnavailableError, OverloadedError, VLServeError

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "invalid_json",  # the only HTTPException 400 FastAPI raises: an unparsable body
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    431: "headers_too_large",
}
_STATUS_TYPES = {
    400: "invalid_request_error",
    408: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_for(exc: VLServeError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Answer from an ASGI middleware (before any route runs) with an OpenAI error body."""
    type_ = _STATUS_TYPES.get(status, "internal_error")
    body = json.dumps(error_body(message, type_, None, code)).encode()
    start_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


def response_for(exc: VLServeError) -> JSONResponse:
    headers = {}
    if isinstance(exc, OverloadedError | EngineUnavailableError):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(body_for(exc), status_code=exc.status, headers=headers)


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
    return JSONResponse(
        error_body(message, "invalid_request_error", param, code), status_code=400
    )


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
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        _note(request, code)
        type_ = _STATUS_TYPES.get(exc.status_code, "internal_error")
        message = str(exc.detail)
        if code == "invalid_json":  # FastAPI's "There was an error parsing the body"
            message = (
                "the request body could not be parsed as JSON (invalid UTF-8, a number too "
                "long to parse, or nesting too deep)"
            )
        return JSONResponse(
            error_body(message, type_, None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body("internal server error", "internal_error", None, "internal_error"),
            status_code=500,
        )
