"""Thin handlers: validate → media → engine.generate() → JSON or SSE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vlserve.api import protocol as p
from vlserve.api.convert import SamplingDefaults, check_supported, to_sampling
from vlserve.api.errors import body_for
from vlserve.api.sse import DONE, frame
from vlserve.engine.chat import attach_images, split_messages
from vlserve.engine.engine import AsyncEngine, EngineState, RequestStream
from vlserve.engine.request import FinishReason, GenerationRequest, TokenEvent
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
    defaults: SamplingDefaults | None = None
    started: int = 0


def _state(request: Request) -> ServerState:
    return request.app.state.vl


@router.get("/health")
async def health(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    if engine.state is not EngineState.READY:
        status = 503
        body = {"status": engine.state.value}
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


@router.get("/v1/models", response_model=p.ModelList)
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
        400: {"model": p.ErrorResponse},
        404: {"model": p.ErrorResponse},
        429: {"model": p.ErrorResponse},
        503: {"model": p.ErrorResponse},
    },
)
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    if body.model not in state.model_names:
        raise NotFoundError(
            f"the model {body.model!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in state.listed_names)}",
            param="model",
        )
    check_supported(body)
    gen_request = await _build_request(state, body)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    events = state.engine.submit(gen_request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(events, completion_id, body.model, include_usage)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(events, completion_id, body.model, request)


async def _build_request(state: ServerState, body: p.ChatCompletionRequest) -> GenerationRequest:
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
    return GenerationRequest(
        request_id=uuid.uuid4().hex, inputs=inputs, prompt_token_ids=prompt_ids, sampling=sampling
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
    events: RequestStream, completion_id: str, model: str, request: Request
) -> Response:
    """Collect a whole completion, aborting it if the client goes away meanwhile."""
    collect = asyncio.ensure_future(_collect(events))
    try:
        while not collect.done():
            await asyncio.wait({collect}, timeout=_DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()
                log.info("client disconnected; request aborted")
                return Response(status_code=499)
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
                finish_reason=last.finish_reason.value,
            )
        ],  # type: ignore[union-attr, arg-type]
        usage=_usage(last),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


async def _collect(events: AsyncIterator[TokenEvent]) -> tuple[str, TokenEvent]:
    pieces: list[str] = []
    last: TokenEvent | None = None
    async for event in events:
        pieces.append(event.text)
        last = event
    assert last is not None  # the engine always ends a request with a finishing event
    return "".join(pieces), last


async def _sse(
    events: RequestStream, completion_id: str, model: str, include_usage: bool
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
