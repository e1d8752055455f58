"""Admission and batching policy: which waiting requests join the running batch at each step.

Torch-free on purpose: the policy is tested in microseconds, apart from the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from vlserve.errors import ContextLengthError, OverloadedError


class Schedulable(Protocol):
    request_id: str

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # rows decoded together
    max_num_batched_tokens: int = 65_536  # KV budget: rows x the longest row's prompt + max_tokens
    max_prefill_tokens: int = 8_192  # prompt tokens admitted per step (at least one request)
    max_queue: int = 256  # waiting requests beyond which submit() answers 429

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")


@dataclass
class StepPlan(Generic[S]):
    """What the next engine step does: prefill ``admitted``, then decode ``running``."""

    admitted: list[S] = field(default_factory=list)
    running: list[S] = field(default_factory=list)


class Scheduler(Generic[S]):
    """FIFO admission under row, token and queue limits.

    Strict FIFO: when the oldest waiting request does not fit yet, nobody overtakes it, so a long
    prompt is never starved by a stream of short ones. Capacity is reserved for a request's whole
    ``prompt + max_tokens`` at admission, so a running request never has to be evicted. The decode
    cache is one tensor left-padded to its longest row, so what a batch can occupy is
    ``rows x longest row``: that padded footprint, not the sum of the rows, is kept within
    ``max_num_batched_tokens``.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self._longest = 0  # the largest cost among running rows

    @staticmethod
    def cost(seq: Schedulable) -> int:
        return seq.num_prompt_tokens + seq.max_tokens

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise now what ``add`` would raise for such a request: 400 if it could never be
        admitted whatever else runs, 429 if the waiting queue is full."""
        if num_prompt_tokens + max_tokens > self.config.max_num_batched_tokens:
            raise ContextLengthError(
                f"this request needs {num_prompt_tokens} prompt + {max_tokens} completion "
                f"tokens, more than the server's budget of {self.config.max_num_batched_tokens} "
                "(--max-num-batched-tokens); shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        if len(self.waiting) >= self.config.max_queue:
            raise OverloadedError(
                f"server is at capacity ({len(self.running)} running, {len(self.waiting)} "
                "waiting); retry later"
            )

    def add(self, seq: S) -> None:
        self.check_admissible(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.append(seq)

    def schedule(self) -> StepPlan[S]:
        """Admit waiting requests in order while they fit; the caller prefills them."""
        cfg = self.config
        admitted: list[S] = []
        prefill_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_num_seqs:
            head = self.waiting[0]
            rows = len(self.running) + len(admitted) + 1
            longest = max(self._longest, self.cost(head))
            if rows * longest > cfg.max_num_batched_tokens:
                break
            if admitted and prefill_tokens + head.num_prompt_tokens > cfg.max_prefill_tokens:
                break
            self.waiting.popleft()
            admitted.append(head)
            prefill_tokens += head.num_prompt_tokens
            self._longest = longest
        self.running.extend(admitted)
        return StepPlan(admitted=admitted, running=list(self.running))

    def finish(self, seqs: Iterable[S]) -> None:
        """Drop finished (or failed, or aborted) requests from running or waiting."""
        for seq in seqs:
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
        self._longest = max((self.cost(s) for s in self.running), default=0)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def reserved_tokens(self) -> int:
        """The padded footprint the running rows may grow to."""
        return len(self.running) * self._longest

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
