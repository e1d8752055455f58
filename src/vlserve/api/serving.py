"""Serving: a request's TokenEvents → an OpenAI chat.completion, or its SSE chunks (no HTTP)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from vlserve.api import protocol as p
from vlserve.api.errors import body_for
from vlserve.api.sse import DONE, frame
from vlserve.engine.request import FinishReason, TokenEvent
from vlserve.engine.stream import RequestStream
from vlserve.errors import EngineError, VLServeError


@dataclass(frozen=True)
class Completion:
    """Who the response is for: its id, model name and the per-event observer."""

    id: str
    model: str
    track: Callable[[TokenEvent], None]


def usage(event: TokenEvent) -> p.Usage:
    return p.Usage(
        prompt_tokens=event.num_prompt_tokens,
        completion_tokens=event.num_completion_tokens,
        total_tokens=event.num_prompt_tokens + event.num_completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=event.num_cached_tokens),
    )


def raise_if_failed(event: TokenEvent) -> None:
    if event.error is not None:
        raise event.error
    if event.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
        raise EngineError(f"generation ended early ({event.finish_reason.value})")


async def collect(events: AsyncIterator[TokenEvent], out: Completion) -> p.ChatCompletion:
    """The whole completion, once the request has finished."""
    pieces: list[str] = []
    last: TokenEvent | None = None
    async for event in events:
        out.track(event)
        pieces.append(event.text)
        last = event
    if last is None:  # the engine always ends a request with a finishing event
        raise EngineError("generation ended without a final event")
    raise_if_failed(last)
    return p.ChatCompletion(
        id=out.id,
        created=int(time.time()),
        model=out.model,
        choices=[
            p.Choice(
                index=0,
                message=p.AssistantMessage(content="".join(pieces)),
                finish_reason=last.finish_reason.value,  # type: ignore[union-attr, arg-type]
            )
        ],
        usage=usage(last),
    )


async def stream_chunks(
    events: RequestStream, out: Completion, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE frames: the role, content deltas, the finish reason, usage if asked, then [DONE];
    an error after the start becomes an error event, then [DONE]."""
    created = int(time.time())

    def chunk(delta: p.Delta, finish: str | None = None) -> bytes:
        return frame(
            p.ChatCompletionChunk(
                id=out.id,
                created=created,
                model=out.model,
                choices=[p.ChunkChoice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
            )
        )

    try:
        yield chunk(p.Delta(role="assistant", content=""))
        async for event in events:
            out.track(event)
            if event.text:
                yield chunk(p.Delta(content=event.text))
            if not event.finished:
                continue
            raise_if_failed(event)
            yield chunk(p.Delta(), event.finish_reason.value)  # type: ignore[union-attr]
            if include_usage:
                yield frame(
                    p.ChatCompletionChunk(
                        id=out.id, created=created, model=out.model, choices=[], usage=usage(event)
                    )
                )
        yield DONE
    except VLServeError as exc:
        yield frame(body_for(exc))
        yield DONE
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
