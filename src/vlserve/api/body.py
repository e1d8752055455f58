"""Request bodies parsed off the event loop, within budgets, before any value is built.

A JSON parser builds every value it reads, holding the GIL all the while, so the event loop's
thread waits for it wherever it runs: a 48 MB body of empty arrays took 9-14 s in ``json`` or
orjson. So a body is first *scanned* on a worker thread: a walk over its structural characters
(C-speed searches in windows of 1 MiB, Python in between, so the GIL passes back to the loop
every few milliseconds) that counts its tokens against ``MAX_JSON_TOKENS``, its nesting against
``MAX_JSON_DEPTH``, and reads the top-level keys, so an unknown field is refused before its
value is built. Only a body within those budgets is parsed (orjson) and validated (pydantic),
on the same thread, each a bounded stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from vlserve.errors import InvalidRequestError, PayloadTooLargeError

# A valid request nests about 6 levels (messages, parts, image_url) plus a schema's own, which
# is refused past 64 levels (api.tools); 128 leaves room for both.
MAX_JSON_DEPTH = 128
# The scan's steps: each bracket, comma and string (a key or a value), each escaped quote in a
# string and each 1 MiB without any of them; about two per value. A million is over a hundred
# times what the 4,096 content parts a request may hold take, and a schema at its
# 100,000-character cap has at most about 100,000.
MAX_JSON_TOKENS = 1_000_000
_WINDOW = 1 << 20  # bytes searched per C call: a few milliseconds holding the GIL
_STRUCTURAL = re.compile(rb'[\[\]{},"]')
_QUOTE, _BACKSLASH, _COMMA = 0x22, 0x5C, 0x2C
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")
_MAX_KEY_BYTES = 256  # no field name is longer; a longer key is unknown and shown cut


class _Scan:
    """One body's walk: its depth, its tokens, and the root object's keys."""

    def __init__(
        self, body: bytes, known: frozenset[str], max_depth: int, max_tokens: int
    ) -> None:
        self.body = body
        self.known = known
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.steps = 0

    def run(self) -> None:
        body, n = self.body, len(self.body)
        depth, pos, root_is_object, expect_key = 0, 0, False, False
        while pos < n:
            match = _STRUCTURAL.search(body, pos, min(pos + _WINDOW, n))
            if match is None:  # a long run of digits or blanks: the next window
                pos = min(pos + _WINDOW, n)
                self._count()
                continue
            at = match.start()
            char = body[at]
            self._count()
            if char == _QUOTE:
                end = self._string_end(at + 1)
                if end < 0:
                    return  # unterminated: the parser says where
                if expect_key:
                    self._check_key(at, end + 1)
                expect_key = False
                pos = end + 1
                continue
            pos = at + 1
            if char in _OPEN:
                depth += 1
                if depth > self.max_depth:
                    raise InvalidRequestError(
                        f"the request body nests deeper than {self.max_depth} levels",
                        code="invalid_json",
                    )
                if depth == 1:
                    root_is_object = char == 0x7B
                expect_key = depth == 1 and root_is_object
            elif char in _CLOSE:
                depth -= 1
                expect_key = False
            else:  # a comma
                expect_key = depth == 1 and root_is_object

    def _check_key(self, start: int, end: int) -> None:
        """Refuse a top-level key the model does not know, before its value is scanned."""
        body = self.body
        if end - start > _MAX_KEY_BYTES:
            name = body[start + 1 : start + 65].decode("utf-8", "replace") + "..."
        else:
            try:
                name = orjson.loads(body[start:end])
            except orjson.JSONDecodeError:
                return  # the parser reports it
        if name not in self.known:
            raise RequestValidationError(
                [
                    {
                        "type": "extra_forbidden",
                        "loc": ("body", name),
                        "msg": "Extra inputs are not permitted",
                        "input": None,
                    }
                ]
            )

    def _string_end(self, start: int) -> int:
        """The index of the quote that closes the string whose text begins at ``start``, or -1.
        A quote is escaped when an odd run of backslashes precedes it; the run is measured on
        the piece since the last quote (copied, then stripped, in C), so a string costs O(its
        length) however it is escaped."""
        body, piece_start = self.body, start
        while True:
            end = body.find(b'"', piece_start)
            if end < 0:
                return -1
            if body[end - 1] != _BACKSLASH:
                return end
            piece = body[piece_start:end]
            if (len(piece) - len(piece.rstrip(b"\\"))) % 2 == 0:
                return end
            self._count()
            piece_start = end + 1

    def _count(self) -> None:
        self.steps += 1
        if self.steps > self.max_tokens:
            raise PayloadTooLargeError(
                f"the request body holds more than {self.max_tokens} JSON tokens (brackets, "
                "commas and strings), the server's limit"
            )


def _field_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias or name for name, f in model.model_fields.items())


def parse_model(
    body: bytes,
    model: type[BaseModel],
    max_depth: int = MAX_JSON_DEPTH,
    max_tokens: int = MAX_JSON_TOKENS,
) -> BaseModel:
    """Scan, parse and validate ``body`` as ``model`` (on a worker thread). Raises
    ``RequestValidationError`` (the same errors FastAPI's own parsing gives: unknown fields,
    invalid JSON, invalid values) or a ``VLServeError`` (too deep, too many tokens)."""
    _Scan(body, _field_names(model), max_depth, max_tokens).run()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in errors]
        ) from None


def is_json(content_type: str | None) -> bool:
    """FastAPI's test (strict content type): application/json or application/*+json."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


# Two threads: bodies parse in parallel on two cores, and a flood of them queues here, not on
# the event loop (the middleware's --max-inflight-body-mb bounds what waits).
_PARSERS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="vlserve-json")


class BoundedJSONRoute(APIRoute):
    """A route whose JSON body model is parsed by ``parse_model`` on a worker thread; FastAPI
    then receives the validated model (which it passes through without validating again)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        model = field.field_info.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler

        async def parse_then_handle(request: Request) -> Response:
            if is_json(request.headers.get("content-type")):
                body = await request.body()
                if body:
                    loop = asyncio.get_running_loop()
                    parsed = await loop.run_in_executor(_PARSERS, parse_model, body, model)
                    request._json = parsed  # what FastAPI's handler reads
            return await handler(request)

        return parse_then_handle
