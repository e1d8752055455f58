"""Admission, batching and preemption: which sequences the next engine step runs.

Torch-free on purpose: the policy is tested in microseconds, apart from the model.

Policy (nano-vllm's, with vLLM's recompute preemption):
- a step is either a prefill of newcomers or one decode step of every running sequence;
  newcomers go first, so a request waits for at most one decode step to start;
- admission is strict FIFO: when the oldest waiting request does not fit yet, nobody overtakes
  it, so a long prompt is never starved by a stream of short ones;
- the KV budget counts what is used (prompt plus the tokens generated so far, in blocks), not
  prompt plus ``max_tokens``; a newcomer is admitted when its uncached blocks fit now, keeping a
  small reserve so the running rows can grow;
- when a running sequence needs a block and none is free (cached free blocks are evicted first),
  the newest running sequence is preempted: its blocks are freed and it goes back to the head of
  the queue, to be recomputed (prompt plus its output so far, mostly from the prefix cache);
- a request that could never fit (prompt plus ``max_tokens`` over the whole budget) is refused
  at once with a 400; a full waiting queue answers 429.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from vlserve.engine.block_manager import BlockManager, BlockSequence
from vlserve.engine.sequence import SequenceStatus
from vlserve.errors import ContextLengthError, OverloadedError


class Schedulable(BlockSequence, Protocol):
    request_id: str
    num_prompt_tokens: int

    status: SequenceStatus

    @property
    def max_tokens(self) -> int: ...


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # rows decoded together
    max_prefill_tokens: int = 8_192  # uncached prompt tokens prefilled per step (>= one request)
    max_queue: int = 256  # waiting requests beyond which submit() answers 429
    reserve_fraction: float = 0.01  # of the KV blocks kept free at admission, for growth

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError("reserve_fraction must be in [0, 1)")


@dataclass
class StepPlan(Generic[S]):
    """What the next step runs: a prefill of ``seqs`` or a decode step of them."""

    seqs: list[S]
    is_prefill: bool
    preempted: list[S]


class Scheduler(Generic[S]):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self.num_preemptions = 0

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int, count: int = 1) -> None:
        """Raise now what ``add`` would raise for ``count`` such sequences: 400 if one could
        never be admitted whatever else runs, 429 if the waiting queue has no room for all."""
        budget = self.blocks.capacity_tokens
        if num_prompt_tokens + max_tokens > budget:
            raise ContextLengthError(
                f"this request needs {num_prompt_tokens} prompt + {max_tokens} completion "
                f"tokens, more than the server's KV cache of {budget} tokens "
                "(--kv-cache-tokens); shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        if len(self.waiting) + count > self.config.max_queue:
            raise OverloadedError(
                f"server is at capacity ({len(self.running)} running, {len(self.waiting)} "
                "waiting); retry later"
            )

    def add(self, seq: S) -> None:
        self.check_admissible(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.append(seq)

    def schedule(self) -> StepPlan[S]:
        plan = self._admit()
        return plan if plan.seqs else self._decode()

    def _admit(self) -> StepPlan[S]:
        cfg = self.config
        admitted: list[S] = []
        tokens = 0
        reserve = int(self.blocks.num_blocks * cfg.reserve_fraction)
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            head = self.waiting[0]
            todo = head.num_tokens - self.blocks.lookup(head)
            if admitted and tokens + todo > cfg.max_prefill_tokens:
                break
            if not self.blocks.can_allocate(head, reserve if self.running else 0):
                break
            self.blocks.allocate(head)
            self.waiting.popleft()
            head.status = SequenceStatus.RUNNING
            self.running.append(head)
            admitted.append(head)
            tokens += todo
        return StepPlan(admitted, True, [])

    def _decode(self) -> StepPlan[S]:
        preempted: list[S] = []
        scheduled: list[S] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(seq)
        return StepPlan(scheduled, False, preempted)

    def _preempt(self, seq: S) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: S) -> None:
        """Drop a finished (or failed, or aborted) sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def __iter__(self) -> Iterator[S]:
        """Every sequence the scheduler holds, running first."""
        yield from list(self.running)
        yield from list(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
