"""Thin handlers: validate → media → engine.generate() → JSON or SSE."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from vlserve.api import protocol as p
from vlserve.api.convert import SamplingDefaults, check_supported, to_sampling
from vlserve.api.errors import body_for
from vlserve.api.metrics import Metrics, RequestRecord
from vlserve.api.sse import DONE, frame
from vlserve.engine.chat import attach_images, split_messages
from vlserve.engine.engine import AsyncEngine, EngineState
from vlserve.engine.request import FinishReason, GenerationRequest, TokenEvent
from vlserve.engine.stream import RequestStream
from vlserve.errors import EngineError, EngineUnavailableError, NotFoundError, VLServeError
from vlserve.media import MediaLoader

log = logging.getLogger(__name__)
router = APIRouter()
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    engine: AsyncEngine
    media: MediaLoader
    model_names: tuple[str, ...]  # every name a request may use
    listed_names: tuple[str, ...]  # the names /v1/models reports
    metrics: Metrics
    defaults: SamplingDefaults | None = None
    started: int = 0
    draining: bool = False  # SIGTERM received: new requests get 503
    drain_expired: bool = False  # the drain deadline passed: in-flight requests end with 503
    streams: set[RequestStream] = field(default_factory=set)  # in-flight generations

    def start_draining(self, timeout_s: float) -> None:
        """Stop taking requests; end those still running shortly before uvicorn would cut them."""
        if self.draining:
            return
        self.draining = True
        margin_s = min(1.0, timeout_s / 4)
        asyncio.get_running_loop().call_later(timeout_s - margin_s, self._expire_drain)

    def _expire_drain(self) -> None:
        self.drain_expired = True
        if self.streams:
            log.warning("shutdown deadline: ending %d request(s) with 503", len(self.streams))
        for stream in list(self.streams):
            stream.fail(_shutting_down())


def _shutting_down() -> EngineUnavailableError:
    return EngineUnavailableError("the server is shutting down; retry", retry_after_s=1)


def _state(request: Request) -> ServerState:
    return request.app.state.vl


def _record(request: Request) -> RequestRecord:
    record = getattr(request.state, "record", None)
    if record is None:  # only when the app runs without its middleware (never in vlserve serve)
        record = RequestRecord(request_id=uuid.uuid4().hex, method=request.method, path="")
        request.state.record = record
    return record


# OpenAPI 3.1 reads an event-stream schema as the schema of each event.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a ChatCompletionChunk or an ErrorResponse as JSON, or [DONE] last",
        }
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": p.ErrorResponse} for status in statuses}


_LIMITS = _errors(413, 431)  # the middleware's, on every route
_ERRORS = _errors(401, 413, 431, 503)
_CHAT_ERRORS = _errors(400, 401, 404, 413, 429, 431, 500, 503, 504)


@router.get(
    "/health",
    response_model=p.Health,
    responses={503: {"model": p.Health, "description": "loading, draining or failed"}, **_LIMITS},
)
async def health(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    if engine.state is not EngineState.READY or state.draining:
        status = 503
        body = {"status": "draining" if state.draining else engine.state.value}
        return JSONResponse(body, status_code=status, headers={"Retry-After": "5"})
    return JSONResponse(
        {
            "status": "ok",
            "model": state.listed_names[0],
            "device": engine.device.type,
            "dtype": engine.device.dtype_name,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
        }
    )


@router.get("/metrics", response_class=PlainTextResponse, responses=_LIMITS)
async def metrics(request: Request) -> Response:
    m = _state(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models", response_model=p.ModelList, responses=_ERRORS)
async def list_models(request: Request) -> p.ModelList:
    state = _state(request)
    runner = state.engine.runner
    max_len = runner.max_model_len if runner is not None else None
    cards = [
        p.ModelCard(
            id=name,
            created=state.started,
            root=state.engine.config.model_path,
            max_model_len=max_len,
        )
        for name in state.listed_names
    ]
    return p.ModelList(data=cards)


@router.post(
    "/v1/chat/completions",
    response_model=p.ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
        **_CHAT_ERRORS,
    },
)
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    if state.draining:
        raise _shutting_down()
    if body.model not in state.model_names:
        raise NotFoundError(
            f"the model {body.model!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in state.listed_names)}",
            param="model",
        )
    record = _record(request)
    record.model = body.model
    check_supported(body)
    gen_request = await _build_request(state, body, record.request_id)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    events = state.engine.submit(gen_request)
    state.streams.add(events)
    if state.drain_expired:
        events.fail(_shutting_down())
    track = functools.partial(_track, record, gen_request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(events, completion_id, body.model, include_usage, track)
        return StreamingResponse(
            _forget_after(state, events, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return await _complete(events, completion_id, body.model, request, track)
    finally:
        state.streams.discard(events)


async def _forget_after(
    state: ServerState, events: RequestStream, stream: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    try:
        async for frame_bytes in stream:
            yield frame_bytes
    finally:
        state.streams.discard(events)


def _track(record: RequestRecord, request: GenerationRequest, event: TokenEvent) -> None:
    """Fill the request's record from its events (TTFT, queue time, tokens, finish)."""
    if record.ttft_s is None and event.num_completion_tokens:
        record.first_token()
        if request.scheduled_time is not None:
            record.queue_s = request.scheduled_time - request.arrival_time
    # every event, so a request cut off mid-way still reports what it generated
    record.prompt_tokens = event.num_prompt_tokens
    record.completion_tokens = event.num_completion_tokens
    if event.finished:
        record.finish_reason = event.finish_reason.value  # type: ignore[union-attr]
        if event.error is not None:
            record.error_code = event.error.code


async def _build_request(
    state: ServerState, body: p.ChatCompletionRequest, request_id: str
) -> GenerationRequest:
    engine = state.engine
    runner = engine.runner
    if runner is None or engine.state is not EngineState.READY or state.defaults is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    template, urls = split_messages(messages)
    images = await state.media.load_many(urls)
    inputs = await engine.prepare(attach_images(template, images))
    prompt_ids = inputs["input_ids"][0].tolist()
    sampling = to_sampling(
        body,
        state.defaults,
        num_prompt_tokens=len(prompt_ids),
        max_model_len=runner.max_model_len,
        vocab_size=runner.vocab_size,
    )
    engine.check_admission(len(prompt_ids), sampling.max_tokens)  # 400/429 before the encoder
    inputs = await engine.encode(inputs)
    return GenerationRequest(
        request_id=request_id,
        inputs=inputs,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        user=body.user,
    )


def _usage(event: TokenEvent) -> p.Usage:
    return p.Usage(
        prompt_tokens=event.num_prompt_tokens,
        completion_tokens=event.num_completion_tokens,
        total_tokens=event.num_prompt_tokens + event.num_completion_tokens,
    )


def _raise_if_failed(event: TokenEvent) -> None:
    if event.error is not None:
        raise event.error
    if event.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
        raise EngineError(f"generation ended early ({event.finish_reason.value})")


async def _complete(
    events: RequestStream,
    completion_id: str,
    model: str,
    request: Request,
    track: Callable[[TokenEvent], None],
) -> Response:
    """Collect a whole completion, aborting it if the client goes away meanwhile."""
    collect = asyncio.ensure_future(_collect(events, track))
    try:
        while not collect.done():
            await asyncio.wait({collect}, timeout=_DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()
                return Response(status_code=499)  # nobody reads it; the request log says 499
        text, last = collect.result()
    finally:
        if not collect.done():
            collect.cancel()
        await events.aclose()
    _raise_if_failed(last)
    completion = p.ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=model,
        choices=[
            p.Choice(
                index=0,
                message=p.AssistantMessage(content=text),
                finish_reason=last.finish_reason.value,  # type: ignore[union-attr, arg-type]
            )
        ],
        usage=_usage(last),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


async def _collect(
    events: AsyncIterator[TokenEvent], track: Callable[[TokenEvent], None]
) -> tuple[str, TokenEvent]:
    pieces: list[str] = []
    last: TokenEvent | None = None
    async for event in events:
        track(event)
        pieces.append(event.text)
        last = event
    if last is None:  # the engine always ends a request with a finishing event
        raise EngineError("generation ended without a final event")
    return "".join(pieces), last


async def _sse(
    events: RequestStream,
    completion_id: str,
    model: str,
    include_usage: bool,
    track: Callable[[TokenEvent], None],
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: p.Delta, finish: str | None = None) -> bytes:
        return frame(
            p.ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=model,
                choices=[p.ChunkChoice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
            )
        )

    try:
        yield chunk(p.Delta(role="assistant", content=""))
        async for event in events:
            track(event)
            if event.text:
                yield chunk(p.Delta(content=event.text))
            if not event.finished:
                continue
            _raise_if_failed(event)
            yield chunk(p.Delta(), event.finish_reason.value)  # type: ignore[union-attr]
            if include_usage:
                yield frame(
                    p.ChatCompletionChunk(
                        id=completion_id,
                        created=created,
                        model=model,
                        choices=[],
                        usage=_usage(event),
                    )
                )
        yield DONE
    except VLServeError as exc:
        yield frame(body_for(exc))
        yield DONE
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
