"""Admission, batching and preemption: which sequences the next engine step runs.

Torch-free on purpose: the policy is tested in microseconds, apart from the model.

Policy (nano-vllm's, with vLLM's recompute preemption and chunked prefill):
- a step is either a prefill of newcomers or one decode step of every running sequence;
  newcomers go first, so a request waits for at most one decode step to start;
- a prefill step computes at most ``max_prefill_tokens`` token positions, counted as the step
  computes them: a prefill batch is right-padded to its longest row, so rows x the longest row's
  new tokens. A longer prompt is prefilled in chunks over several steps (a row's ``end``), and
  while one is, prefill and decode steps alternate, so the running rows and the newcomers wait
  for one chunk, never for the whole prompt. While newcomers wait, a chunk is narrowed to leave
  them room (the budget over 1 + the newcomers that could join), so a burst of short requests
  beside a long prompt starts in one step instead of being padded to the chunk, or trickling in
  one per chunk;
- admission is strict FIFO: when the oldest waiting request does not fit yet, nobody overtakes
  it, so a long prompt is never starved by a stream of short ones;
- rows are shared by requests, not by choices: the extra choices of all requests together
  (``n`` > 1: every choice but a request's first) hold at most ``extra_choice_rows`` rows
  (half of ``max_num_seqs``), so at least half is always left to first choices. An extra
  choice past that bound is passed over without holding up the queue behind it, and keeps its
  place: it takes the next row an extra choice frees, so it is never starved. While other
  requests' extra choices wait, at most one such batch of them waits beyond the rows free to
  them; a request that would add more is refused with 429 at once rather than queued for
  longer than one generation (with none waiting, any ``n`` is taken). So two
  ``n=16`` requests on 32 rows no longer hold every row for their whole length while single
  requests wait (issue 22's soak: 62 requests queued 85-99 s behind them). Tried first and
  dropped: a reserve of free rows (under sustained load rows never freed, and starved extra
  choices filled the queue until every request got 429), and three quarters of the rows
  (6 of 32 rows were left to 60 clients: p50 latency 16 s);
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from vlserve.engine.block_manager import BlockManager, BlockSequence
from vlserve.engine.fields import OUTPUT_TOKENS, about
from vlserve.engine.sequence import SequenceStatus
from vlserve.errors import ContextLengthError, OverloadedError
from vlserve.settings import check, option


class Schedulable(BlockSequence, Protocol):
    request_id: str
    num_prompt_tokens: int
    status: SequenceStatus
    index: int  # which of its request's n choices (0: the first)

    @property
    def max_tokens(self) -> int: ...


S = TypeVar("S", bound=Schedulable)

# Prefill chunk sizes by default: on two CPU cores 2048 tokens of the tiny model take at most
# about 0.45 s (a 12,000-token text prompt: 2.6 s in six chunks, with decode steps between),
# which is how long a running row or a newcomer waits for a long prompt's chunk; an
# accelerator amortizes its launches over larger chunks.
CPU_PREFILL_TOKENS = 2_048
DEVICE_PREFILL_TOKENS = 8_192


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(
        32,
        group="batching",
        min=1,
        metavar="N",
        help="requests decoded together in one batch (1 = no batching)",
    )
    # uncached prompt tokens per prefill step (longer prompts are chunked); None: the engine
    # picks by device (CPU_PREFILL_TOKENS / DEVICE_PREFILL_TOKENS)
    max_prefill_tokens: int | None = option(
        None,
        group="batching",
        min=1,
        metavar="N",
        doc_default=f"{CPU_PREFILL_TOKENS} on CPU, {DEVICE_PREFILL_TOKENS} on accelerators",
        help="token positions computed in one prefill step (rows x the longest row's new "
        "tokens: a batch is padded to its longest row); longer prompts are prefilled in chunks "
        "interleaved with decode steps, so nobody waits for a whole long prompt",
    )
    max_queue: int = option(
        256,
        group="batching",
        min=0,
        metavar="N",
        help="requests waiting beyond the batch's free rows (those that cannot start at the "
        "next step), past which new ones get 429 + Retry-After (a request with n > 1 also gets "
        "429 when, beside other requests' waiting extra choices, more than one batch of them "
        "would wait: they hold at most half of the --max-num-seqs rows)",
    )
    reserve_fraction: float = 0.01  # of the KV blocks kept free at admission, for growth

    def __post_init__(self) -> None:
        check(self)
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError("reserve_fraction must be in [0, 1)")

    @property
    def extra_choice_rows(self) -> int:
        """Rows the extra choices of all requests may hold together (at least one)."""
        return max(self.max_num_seqs // 2, 1)


@dataclass(frozen=True)
class StepRow(Generic[S]):
    """One row of a step: ``seq`` computes its positions ``[start, end)`` (a decode row: its
    newest token only). A prefill row that ends before the sequence does (a chunk) samples
    nothing."""

    seq: S
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan(Generic[S]):
    """What the next step runs: a prefill of ``rows`` or a decode step of them, and whom the
    scheduler preempted to make room."""

    rows: list[StepRow[S]]
    is_prefill: bool
    preempted: list[S]

    @property
    def seqs(self) -> list[S]:
        return [row.seq for row in self.rows]

    @property
    def num_tokens(self) -> int:
        """Positions the step computes (a prefill's rows are padded beyond these)."""
        return sum(row.end - row.start for row in self.rows)


class Scheduler(Generic[S]):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self.num_preemptions = 0
        self._last_was_prefill = False

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int, count: int = 1) -> None:
        """Raise now what ``add`` would raise for ``count`` such sequences: 400 if one could
        never be admitted whatever else runs, 429 if the queue has no room for all. The queue is
        the waiting sequences that cannot start at the next step: those the free rows of the
        batch will take are not queued, whether or not the inference thread has taken them yet
        (otherwise whether a request is refused would depend on that thread's timing)."""
        budget = self.blocks.capacity_tokens
        if num_prompt_tokens + max_tokens > budget:
            raise about(
                OUTPUT_TOKENS,
                ContextLengthError(
                    f"this request needs {num_prompt_tokens} prompt + {max_tokens} completion "
                    f"tokens, more than the server's KV cache of {budget} tokens "
                    "(--kv-cache-tokens); shorten the prompt or lower max_tokens"
                ),
            )
        free_rows = max(0, self.config.max_num_seqs - len(self.running))
        if len(self.waiting) + count - free_rows > self.config.max_queue:
            raise OverloadedError(
                f"server is at capacity ({len(self.running)} running, {len(self.waiting)} "
                "waiting); retry later"
            )
        # with no other request's extra choice waiting, any n is taken: its choices take turns
        waiting = _extras(self.waiting)
        if count > 1 and waiting:
            rows = self.config.extra_choice_rows
            free = max(0, rows - _extras(self.running))
            if waiting + count - 1 - free > rows:
                raise OverloadedError(
                    f"server is at capacity for requests with n > 1 ({_extras(self.running)} "
                    f"extra choices running, {waiting} waiting); retry later "
                    "or lower n"
                )

    def add(self, seq: S) -> None:
        self.check_admissible(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.append(seq)

    def schedule(self) -> StepPlan[S]:
        partial = [s for s in self.running if _prefilling(s)]
        if partial and self._last_was_prefill and any(not _prefilling(s) for s in self.running):
            plan = self._decode()  # a chunk ran last: the running rows' turn
        else:
            plan = self._admit(partial)
            if not plan.seqs:
                plan = self._decode()
        self._last_was_prefill = plan.is_prefill and bool(plan.seqs)
        return plan

    def _admit(self, partial: list[S]) -> StepPlan[S]:
        """The next chunk of each prompt being prefilled, then newcomers (FIFO: a newcomer never
        overtakes the head, except past extra choices over their share of the rows), while rows x
        the longest row's new tokens fits the budget; a row wider than its share is chunked."""
        cfg = self.config
        budget = cfg.max_prefill_tokens or DEVICE_PREFILL_TOKENS
        # of a prompt being chunked, while newcomers wait (at least a token: it always moves on)
        share = max(budget // (1 + self._joinable()), 1)
        planned: list[StepRow[S]] = []
        longest = 0  # new tokens of the widest row planned: every row is padded to it
        for seq in partial:
            width = min(share, budget // (len(planned) + 1))
            if width < max(longest, 1):
                break
            planned.append(_prefill_row(seq, width))
            longest = max(longest, planned[-1].end - planned[-1].start)
        reserve = int(self.blocks.num_blocks * cfg.reserve_fraction)
        at = 0  # the oldest waiting sequence not passed over
        extras = _extras(self.running)
        while at < len(self.waiting) and len(self.running) < cfg.max_num_seqs:
            head = self.waiting[at]
            if head.index > 0 and extras >= cfg.extra_choice_rows:
                at += 1  # an extra choice, and extra choices hold their share of the rows
                continue
            width = budget // (len(planned) + 1)  # the widest one more row may be
            if width < max(longest, 1) or not self.blocks.can_allocate(
                head, reserve if self.running else 0
            ):
                break
            self.blocks.allocate(head)
            del self.waiting[at]
            head.status = SequenceStatus.RUNNING
            self.running.append(head)
            extras += head.index > 0
            planned.append(_prefill_row(head, width))
            longest = max(longest, planned[-1].end - planned[-1].start)
        return StepPlan(planned, True, [])

    def _joinable(self) -> int:
        """How many waiting sequences the free rows could take now: first choices, and extra
        choices only up to the rows left to them (the rest are passed over, so a chunk narrowed
        for them would be narrowed for nobody)."""
        extras = _extras(self.waiting)
        room = max(self.config.extra_choice_rows - _extras(self.running), 0)
        eligible = len(self.waiting) - extras + min(extras, room)
        return min(eligible, max(self.config.max_num_seqs - len(self.running), 0))

    def _decode(self) -> StepPlan[S]:
        preempted: list[S] = []
        scheduled: list[StepRow[S]] = []
        for seq in list(self.running):
            if seq not in self.running or _prefilling(seq):  # preempted below, or mid-prefill
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(StepRow(seq, seq.num_tokens - 1, seq.num_tokens))
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


def _prefilling(seq: Schedulable) -> bool:
    """Running, but its prompt (or recompute) not all computed yet: a chunked prefill. (A
    decoding sequence has every token but its newest computed.)"""
    return seq.num_cached_tokens < seq.num_tokens - 1


def _extras(seqs: Iterable[Schedulable]) -> int:
    """How many of ``seqs`` are extra choices (not their request's first)."""
    return sum(seq.index > 0 for seq in seqs)


def _prefill_row(seq: S, budget: int) -> StepRow[S]:
    """This step's prefill of ``seq``: from its first uncached position, within ``budget``, but
    never stopping one short of the end (that last token would then be fed as a decode step)."""
    end = min(seq.num_tokens, seq.num_cached_tokens + budget)
    return StepRow(seq, seq.num_cached_tokens, seq.num_tokens if end == seq.num_tokens - 1 else end)
