"""Serving: a request's TokenEvents → an OpenAI chat.completion, or its SSE chunks (no HTTP).

Both shapes are built from the same per-choice pieces (``ChoiceBuilder``): content text, tool
calls parsed as the text streams, and logprobs. So a streamed response reassembles to exactly
the non-streamed one, tool calls and logprobs included.
"""

from __future__ import annotations

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


_LOGPROB = TypeAdapter(p.TokenLogprob)


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
    keep_logprobs: bool = False  # a non-streamed answer's: kept until the end
    # Each token's logprob entry, written as JSON when it arrives: bytes are not tracked by the
    # garbage collector. Kept as pydantic objects (21 a token with top_logprobs=20; 336,000 for
    # n=16 x 1,000 tokens), each full collection walked them all: /health stalled 0.8-1.5 s
    # several times during one such request.
    logprobs: list[bytes] = field(default_factory=list)
    completion_tokens: int = 0
    finish: str | None = None

    def add(self, event: TokenEvent) -> list[Piece]:
        self.completion_tokens = event.num_completion_tokens
        if self.keep_logprobs:
            self.logprobs.extend(_LOGPROB.dump_json(to_logprob(lp)) for lp in event.logprobs)
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
            # the entries are spliced in by completion_json
            logprobs=p.ChoiceLogprobs(content=[]) if with_logprobs else None,
            finish_reason=self.finish,  # type: ignore[arg-type]
        )


class Choices:
    """The builders of a request's choices, and the usage over all of them."""

    def __init__(self, n: int, out: Completion, keep: bool = False) -> None:
        """``keep``: each choice keeps its logprob entries (a non-streamed answer's)."""
        self.out = out
        self.builders = [
            ChoiceBuilder(i, ToolCallParser() if out.parse_tools else None, keep_logprobs=keep)
            for i in range(n)
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


async def collect(events: RequestStream, out: Completion) -> bytes:
    """The whole completion's JSON body, once every choice has finished."""
    choices = Choices(events.n, out, keep=out.logprobs)
    async for event in events:
        choices.add(event)
    if any(b.finish is None for b in choices.builders):  # the engine always ends each choice
        raise EngineError("generation ended without a final event")
    completion = p.ChatCompletion(
        id=out.id,
        created=int(time.time()),
        model=out.model,
        choices=[b.choice(out.logprobs) for b in choices.builders],
        usage=choices.usage(),
    )
    return completion_json(completion, [b.logprobs for b in choices.builders])


def completion_json(completion: p.ChatCompletion, logprobs: list[list[bytes]]) -> bytes:
    """``completion`` as JSON, each choice's logprob entries (already JSON, ``logprobs[i]``)
    spliced into its empty ``logprobs.content``: byte for byte what ``model_dump_json`` of the
    whole would write, with no object built per entry."""
    choices = []
    for choice, entries in zip(completion.choices, logprobs, strict=True):
        text = choice.model_dump_json().encode()
        if choice.logprobs is not None:  # the only '"content":[]' outside a string
            text = text.replace(b'"content":[]', b'"content":[' + b",".join(entries) + b"]", 1)
        choices.append(text)
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
