"""Plain data that crosses the engine boundary: sampling parameters and token events."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vlserve.errors import VLServeError

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens (or the context) ran out
    ABORT = "abort"  # the client went away or the server is shutting down
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class Guide:
    """A grammar the output must follow (structured output, forced tool calls).

    ``kind`` is ``"json_object"`` (any JSON object; ``spec`` empty), ``"json_schema"`` (``spec``
    is the schema as JSON text) or ``"tagged_json"`` (``spec`` is JSON text of
    ``{"begin": str, "end": str, "schema": {...}, "repeat": int}``: ``begin``, a JSON value
    matching ``schema``, ``end``; 1 to ``repeat`` times, a newline between two). JSON is compact: no whitespace between tokens that the grammar does not need.
    ``param`` names the request field an uncompilable grammar is reported against.
    """

    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema", "tagged_json"):
            raise ValueError(f"unknown guide kind {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; ``temperature == 0`` means greedy.

    ``max_tokens=None`` lets the engine choose: the server's default, capped by what is left of
    the context and of the KV cache.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1  # choices: one sequence each, sharing the prepared and encoded prompt
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and top k
    guide: Guide | None = None
    # (token id, bias) pairs added to the model's logits before penalties (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias):
            raise ValueError(f"logit_bias needs token ids >= 0 and biases in ±{MAX_LOGIT_BIAS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling looks at earlier tokens (penalties)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's bytes as text (U+FFFD where they are not whole UTF-8)
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` alternatives, most likely first."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request.

    ``text`` is the newly final text (may be empty while bytes of a character or a possible stop
    string are held back). The last event of a request has ``finish_reason`` set, and ``error``
    when it failed.
    """

    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: FinishReason | None = None
    error: VLServeError | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_image_tokens: int = 0  # prompt tokens that are images' placeholders
    num_video_tokens: int = 0  # prompt tokens that are video frames' placeholders
    queue_s: float | None = None  # time from arrival to the first prefill, once scheduled
    index: int = 0  # the choice (0..n-1) this event belongs to
    # one per token of ``token_ids`` when the request asked for logprobs, but none for a token
    # that ended the request (EOS, a stop token id): it is not part of the output
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    """What one engine step did (the ``on_step`` hook: /metrics, benchmarks, tests)."""

    rows: int
    tokens: int  # positions computed (a prefill's padding not counted)
    is_prefill: bool
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_hit_tokens: int  # prompt tokens found in the prefix cache, for rows starting now
    preemptions: int  # running rows the scheduler preempted to make this step fit
    prefix_query_tokens: int = 0  # prompt tokens of the rows starting now (looked up in the cache)
