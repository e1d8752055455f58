"""Serving: a request's TokenEvents → an OpenAI chat.completion, or its SSE chunks (no HTTP).

Both shapes are built from the same per-choice pieces (``ChoiceBuilder``): content text, tool
calls parsed as the text streams, and logprobs. So a streamed response reassembles to exactly
the non-streamed one, tool calls and logprobs included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from vlserve.api import protocol as p
from vlserve.api.errors import body_for
from vlserve.api.sse import DONE, frame
from vlserve.api.tool_calls import CallArguments, CallStart, Content, Piece, ToolCallParser
from vlserve.engine.request import FinishReason, TokenEvent, TokenLogprob
from vlserve.engine.stream import RequestStream
from vlserve.errors import EngineError, VLServeError


@dataclass(frozen=True)
class Completion:
    """Who the response is for and how to build it: id, model name, the per-event observer,
    whether to parse tool calls, to report logprobs, and which media kinds the request brought
    (their tokens are reported)."""

    id: str
    model: str
    track: Callable[[TokenEvent], None]
    parse_tools: bool = False
    logprobs: bool = False
    media: frozenset[str] = frozenset()  # "image", "video"


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    video_tokens: int | None = None,
    image_tokens: int | None = None,
) -> p.Usage:
    """``image_tokens`` (OpenAI's field) and ``video_tokens`` (ours) appear in
    ``prompt_tokens_details`` only when given (requests with images, with videos)."""
    return p.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(
            cached_tokens=cached_tokens, image_tokens=image_tokens, video_tokens=video_tokens
        ),
    )


def raise_if_failed(event: TokenEvent) -> None:
    if event.error is not None:
        raise event.error
    if event.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
        raise EngineError(f"generation ended early ({event.finish_reason.value})")


def to_logprob(lp: TokenLogprob) -> p.TokenLogprob:
    return p.TokenLogprob(
        token=lp.token,
        logprob=lp.logprob,
        bytes=list(lp.bytes),
        top_logprobs=[
            p.TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in lp.top
        ],
    )


@dataclass
class ChoiceBuilder:
    """One choice's pieces as they arrive; ``add`` returns the pieces of one event."""

    index: int
    parser: ToolCallParser | None
    content: list[str] = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)  # [id, name, arguments...]
    logprobs: list[p.TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish: str | None = None

    def add(self, event: TokenEvent) -> list[Piece]:
        self.completion_tokens = event.num_completion_tokens
        self.logprobs.extend(to_logprob(lp) for lp in event.logprobs)
        if self.parser is None:
            pieces: list[Piece] = [Content(event.text)] if event.text else []
        else:
            pieces = self.parser.feed(event.text)
            if event.finished:
                pieces += self.parser.finish()
        for piece in pieces:
            if isinstance(piece, Content):
                self.content.append(piece.text)
            elif isinstance(piece, CallStart):
                self.calls.append([piece.id, piece.name])
            else:
                self.calls[piece.index].append(piece.text)
        if event.finished:
            reason = event.finish_reason.value  # type: ignore[union-attr]
            self.finish = "tool_calls" if self.calls and reason == "stop" else reason
        return pieces

    def choice(self, with_logprobs: bool) -> p.Choice:
        text = "".join(self.content)
        calls = [
            p.ToolCall(id=c[0], function=p.FunctionCall(name=c[1], arguments="".join(c[2:])))
            for c in self.calls
        ]
        return p.Choice(
            index=self.index,
            message=p.AssistantMessage(
                content=(text or None) if calls else text, tool_calls=calls or None
            ),
            logprobs=p.ChoiceLogprobs(content=self.logprobs) if with_logprobs else None,
            finish_reason=self.finish,  # type: ignore[arg-type]
        )


class Choices:
    """The builders of a request's choices, and the usage over all of them."""

    def __init__(self, n: int, out: Completion) -> None:
        self.out = out
        self.builders = [
            ChoiceBuilder(i, ToolCallParser() if out.parse_tools else None) for i in range(n)
        ]
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.image_tokens = 0
        self.video_tokens = 0

    def add(self, event: TokenEvent) -> tuple[ChoiceBuilder, list[Piece]]:
        self.out.track(event)
        self.prompt_tokens = event.num_prompt_tokens
        self.cached_tokens = event.num_cached_tokens
        self.image_tokens = event.num_image_tokens
        self.video_tokens = event.num_video_tokens
        if event.finished:
            raise_if_failed(event)
        builder = self.builders[event.index]
        return builder, builder.add(event)

    def usage(self) -> p.Usage:
        completion = sum(b.completion_tokens for b in self.builders)
        media = self.out.media
        videos = self.video_tokens if "video" in media else None
        images = self.image_tokens if "image" in media else None
        return usage(self.prompt_tokens, completion, self.cached_tokens, videos, images)


async def collect(events: RequestStream, out: Completion) -> p.ChatCompletion:
    """The whole completion, once every choice has finished."""
    choices = Choices(events.n, out)
    async for event in events:
        choices.add(event)
    if any(b.finish is None for b in choices.builders):  # the engine always ends each choice
        raise EngineError("generation ended without a final event")
    return p.ChatCompletion(
        id=out.id,
        created=int(time.time()),
        model=out.model,
        choices=[b.choice(out.logprobs) for b in choices.builders],
        usage=choices.usage(),
    )


# Logprob entries serialized per call: with 20 top logprobs each, about 0.3 MB and a few ms
# holding the GIL. n=16 choices of 1,000 such tokens make a 20-28 MB body, which one
# model_dump_json call wrote in 0.47 s with the event loop stalled throughout.
_SLICE = 256
_LOGPROBS = TypeAdapter(list[p.TokenLogprob])


async def completion_json(completion: p.ChatCompletion) -> bytes:
    """``completion.model_dump_json()``, byte for byte, written in slices of logprob entries
    with the event loop let go between them, so a huge answer never stalls it."""
    if sum(len(c.logprobs.content or ()) for c in completion.choices if c.logprobs) <= _SLICE:
        return completion.model_dump_json().encode()
    choices = []
    for choice in completion.choices:
        entries = choice.logprobs.content if choice.logprobs else None
        if not entries:
            choices.append(choice.model_dump_json().encode())
            continue
        empty = choice.logprobs.model_copy(update={"content": []})  # type: ignore[union-attr]
        shell = choice.model_copy(update={"logprobs": empty}).model_dump_json().encode()
        parts = []
        for start in range(0, len(entries), _SLICE):
            await asyncio.sleep(0)
            parts.append(_LOGPROBS.dump_json(entries[start : start + _SLICE])[1:-1])
        # the only '"content":[]' outside a string (a string's quotes are escaped)
        choices.append(shell.replace(b'"content":[]', b'"content":[' + b",".join(parts) + b"]", 1))
    envelope = completion.model_copy(update={"choices": []}).model_dump_json().encode()
    return envelope.replace(b'"choices":[]', b'"choices":[' + b",".join(choices) + b"]", 1)


def _delta(pieces: list[Piece]) -> p.Delta | None:
    """One delta for an event's pieces: its content, and its tool-call fragments, one entry per
    call (OpenAI's shape: a call's start and its first argument text share an entry; clients
    such as instructor read only the first entry of an index in a chunk)."""
    text = "".join(x.text for x in pieces if isinstance(x, Content))
    calls: dict[int, p.DeltaToolCall] = {}
    for piece in pieces:
        if isinstance(piece, CallStart):
            calls[piece.index] = p.DeltaToolCall(
                index=piece.index,
                id=piece.id,
                type="function",
                function=p.DeltaFunction(name=piece.name, arguments=""),
            )
        elif isinstance(piece, CallArguments):
            entry = calls.get(piece.index)
            if entry is None:
                entry = calls[piece.index] = p.DeltaToolCall(
                    index=piece.index, function=p.DeltaFunction(arguments="")
                )
            entry.function.arguments = (entry.function.arguments or "") + piece.text
    if not text and not calls:
        return None
    return p.Delta(content=text or None, tool_calls=list(calls.values()) or None)


async def stream_chunks(
    events: RequestStream, out: Completion, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE frames: each choice's role, its deltas (content, tool calls, logprobs) and finish
    reason, usage if asked, then [DONE]; an error after the start becomes an error event, then
    [DONE]. Logprobs of tokens whose text is still held back ride on the next chunk of that
    choice."""
    created = int(time.time())
    choices = Choices(events.n, out)
    pending: list[list[p.TokenLogprob]] = [[] for _ in range(events.n)]

    def chunk(index: int, delta: p.Delta, finish: str | None = None) -> bytes:
        logprobs = None
        if out.logprobs and (pending[index] or finish is not None):
            logprobs = p.ChoiceLogprobs(content=pending[index])
            pending[index] = []
        return frame(
            p.ChatCompletionChunk(
                id=out.id,
                created=created,
                model=out.model,
                choices=[
                    p.ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)  # type: ignore[arg-type]
                ],
            )
        )

    try:
        for i in range(events.n):
            yield chunk(i, p.Delta(role="assistant", content=""))
        async for event in events:
            builder, pieces = choices.add(event)
            pending[event.index].extend(to_logprob(lp) for lp in event.logprobs)
            delta = _delta(pieces)
            if delta is not None:
                yield chunk(event.index, delta)
            if event.finished:
                yield chunk(event.index, p.Delta(), builder.finish)
        if include_usage:
            yield frame(
                p.ChatCompletionChunk(
                    id=out.id, created=created, model=out.model, choices=[], usage=choices.usage()
                )
            )
        yield DONE
    except VLServeError as exc:
        yield frame(body_for(exc))
        yield DONE
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
