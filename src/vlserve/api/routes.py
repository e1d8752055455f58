"""Thin handlers: validate → plan (api/plan.py) → engine.generate() → JSON or SSE."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from vlserve.api import protocol as p
from vlserve.api.body import BoundedJSONRoute
from vlserve.api.convert import DEFAULT_MAX_N, SamplingDefaults
from vlserve.api.faults import FaultInjector
from vlserve.api.metrics import Metrics, RequestRecord
from vlserve.api.plan import plan_request
from vlserve.api.serving import Completion, collect, stream_chunks
from vlserve.engine.client import EngineClient, EngineState
from vlserve.engine.request import TokenEvent
from vlserve.engine.stream import RequestStream
from vlserve.errors import EngineUnavailableError, NotFoundError, VLServeError
from vlserve.launch.health import STALLED_HEADER
from vlserve.media import MediaLoader

log = logging.getLogger(__name__)
router = APIRouter(route_class=BoundedJSONRoute)  # bodies parse off the loop, bounded
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    engine: EngineClient
    media: MediaLoader
    model_names: tuple[str, ...]  # every name a request may use
    listed_names: tuple[str, ...]  # the names /v1/models reports
    metrics: Metrics
    defaults: SamplingDefaults | None = None
    max_n: int = DEFAULT_MAX_N  # --max-n: the most choices a request may ask for
    faults: FaultInjector | None = None  # testing only (VLSERVE_FAULT_INJECT)
    started: int = 0
    num_api_keys: int = 0  # with 2 or more, each key's requests share prefix-cache blocks only
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


@router.api_route(
    "/health",
    methods=["GET", "HEAD"],
    response_model=p.Health,
    responses={503: {"model": p.Health, "description": "loading, draining, failed or stalled"}, **_LIMITS},
)
async def health(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    info = engine.model_info
    if engine.state is not EngineState.READY or state.draining or info is None:
        status = 503
        engine_state = engine.state
        body = {"status": "draining" if state.draining else engine_state.value}
        headers = {"Retry-After": "5"}
        if engine_state is EngineState.STALLED and not state.draining:
            headers[STALLED_HEADER] = "stalled"  # launch's probe reads the status line and this
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(
        {
            "status": "ok",
            # the served name, never a filesystem path (probes need no key)
            "model": state.listed_names[0].rstrip("/").rsplit("/", 1)[-1],
            "device": info.device,
            "dtype": info.dtype,
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
    return p.ModelList(data=[_card(state, name) for name in state.listed_names])


@router.get(
    "/v1/models/{model:path}",
    response_model=p.ModelCard,
    responses=_errors(401, 404, 413, 431, 503),
)
async def retrieve_model(model: str, request: Request) -> p.ModelCard:
    """OpenAI's "retrieve model": any name a request may use (names may hold slashes)."""
    state = _state(request)
    _check_model(state, model)
    return _card(state, model)


def _card(state: ServerState, name: str) -> p.ModelCard:
    info = state.engine.model_info
    return p.ModelCard(
        id=name,
        created=state.started,
        root=state.listed_names[0],  # the served name: the weights' path is not the client's
        max_model_len=info.max_model_len if info else None,
    )


def _check_model(state: ServerState, name: str) -> None:
    if name not in state.model_names:
        raise NotFoundError(
            f"the model {name!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in state.listed_names)}",
            param="model",
        )


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
    _check_model(state, body.model)
    record = _record(request)
    record.model = body.model
    prompt, params, reply = await plan_request(
        body,
        max_n=state.max_n,
        ready=functools.partial(_ready, state),
        media=state.media,
        api_key=record.api_key_index if state.num_api_keys > 1 else None,
    )
    if state.faults is not None:
        state.faults.track(record.request_id, body.user)
    # watched: a client gone while its grammar compiles (or its images encode) cancels that
    starting = asyncio.ensure_future(state.engine.generate(prompt, params, record.request_id))
    if not await _done_unless_gone(starting, request):
        if not starting.cancelled() and starting.exception() is None:
            await starting.result().aclose()  # it finished just as the client left
        return Response(status_code=499)
    try:
        events = starting.result()
    except VLServeError as exc:
        reply.rename(exc)  # the engine's neutral field → the name this request used
        raise
    state.streams.add(events)
    if state.drain_expired:
        events.fail(_shutting_down())
    out = reply.completion(
        f"chatcmpl-{uuid.uuid4().hex}", functools.partial(_track, record, state.metrics)
    )
    if reply.stream:
        return StreamingResponse(
            _forget_after(state, events, stream_chunks(events, out, reply.include_usage)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return await _complete(events, out, request)
    finally:
        state.streams.discard(events)


def _ready(state: ServerState) -> tuple[SamplingDefaults, int]:
    """The sampling defaults and the vocabulary size once the engine serves; a 503 before (and
    while it is stalled)."""
    info, engine_state = state.engine.model_info, state.engine.state
    if engine_state is EngineState.STALLED:
        raise EngineUnavailableError(
            "the engine is stalled (no step finished for --engine-stall-timeout); retry shortly",
            retry_after_s=5,
        )
    if info is None or engine_state is not EngineState.READY or state.defaults is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return state.defaults, info.vocab_size


async def _forget_after(
    state: ServerState, events: RequestStream, stream: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    try:
        async for frame_bytes in stream:
            yield frame_bytes
    finally:
        state.streams.discard(events)


def _track(record: RequestRecord, metrics: Metrics, event: TokenEvent) -> None:
    """Fill the request's record from its events (TTFT, queue time, tokens, finish)."""
    metrics.observe_event(record, event)
    if record.ttft_s is None and event.num_completion_tokens:
        record.first_token()
        record.queue_s = event.queue_s
    # every event, so a request cut off mid-way still reports what it generated
    record.prompt_tokens = event.num_prompt_tokens
    record.choice_tokens[event.index] = event.num_completion_tokens
    record.completion_tokens = sum(record.choice_tokens.values())
    record.cached_tokens = event.num_cached_tokens
    if event.finished:
        record.finish_reason = event.finish_reason.value  # type: ignore[union-attr]
        if event.error is not None:
            record.error_code = event.error.code


async def _complete(events: RequestStream, out: Completion, request: Request) -> Response:
    """Collect a whole completion, aborting it if the client goes away meanwhile."""
    task = asyncio.ensure_future(collect(events, out))
    try:
        if not await _done_unless_gone(task, request):
            return Response(status_code=499)  # nobody reads it; the request log says 499
        body = task.result()
    finally:
        if not task.done():
            task.cancel()
        await events.aclose()
    return Response(body, media_type="application/json")


async def _done_unless_gone(task: asyncio.Future[Any], request: Request) -> bool:
    """Wait for ``task``: True once it is done; False if the client went away first (the task
    is then cancelled, and done when this returns)."""
    while not task.done():
        await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.wait({task})
            return False
    return True
