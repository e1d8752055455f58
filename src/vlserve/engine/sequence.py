"""Sequence: one request's life in the engine; it owns its token ids, status and cache blocks."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.request import SamplingParams, TokenEvent


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is decoded at every step
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """The placeholder tokens ``[start, end)`` of one image in a prompt, and its content key."""

    start: int
    end: int
    key: bytes


@dataclass(eq=False)
class Sequence:
    """Identity equality: the scheduler removes sequences by object.

    ``token_ids`` is the prompt followed by every generated token. The last one has no KV yet: a
    step feeds it (or, after a preemption, recomputes everything not cached) and samples the next.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    deadline: float
    arrival_time: float
    prompt: Any = None  # engine.prompt.EncodedPrompt: its positions and image features
    image_spans: tuple[ImageSpan, ...] = ()
    cache_salt: str | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # of the prompt, at its first admission: usage's cached_tokens
    num_image_tokens: int = 0  # of the prompt: usage's image_tokens
    num_video_tokens: int = 0  # of the prompt: usage's video_tokens
    scheduled_time: float | None = None  # when its first prefill started
    detok: IncrementalDetokenizer | None = None
    sampler: Any = None  # engine.sampling.SamplerState
    index: int = 0  # which of the request's n choices
    aborted: bool = False

    @classmethod
    def for_prompt(
        cls,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        emit: Callable[[TokenEvent], None] = lambda _: None,
        deadline: float = float("inf"),
        arrival_time: float = 0.0,
    ) -> Sequence:
        """A waiting sequence for an ``EncodedPrompt`` (its tokens, image spans and salt)."""
        prepared = prompt.prepared
        return cls(
            request_id=request_id,
            token_ids=list(prepared.token_ids),
            num_prompt_tokens=prepared.num_tokens,
            params=params,
            emit=emit,
            deadline=deadline,
            arrival_time=arrival_time,
            prompt=prompt,
            image_spans=tuple(image.span for image in prepared.visuals),
            cache_salt=prepared.cache_salt,
            num_image_tokens=prepared.num_image_tokens,
            num_video_tokens=prepared.num_video_tokens,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def max_tokens(self) -> int:
        return int(self.params.max_tokens or 0)

    @property
    def done(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def image_keys(self, start: int, end: int) -> list[bytes]:
        return [s.key for s in self.image_spans if s.start < end and s.end > start]

    def event(
        self,
        text: str,
        tokens: tuple[int, ...],
        finish: Any = None,
        error: Any = None,
        logprobs: tuple[Any, ...] = (),
    ) -> TokenEvent:
        queued = None if self.scheduled_time is None else self.scheduled_time - self.arrival_time
        return TokenEvent(
            text,
            tokens,
            self.num_prompt_tokens,
            self.num_output_tokens,
            finish,
            error,
            num_cached_tokens=self.num_prefix_hit_tokens,
            num_image_tokens=self.num_image_tokens,
            num_video_tokens=self.num_video_tokens,
            queue_s=queued,
            index=self.index,
            logprobs=logprobs,
        )
