"""Scheduler policy: FIFO, limits respected, no starvation of long prompts, backpressure."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vlserve.engine.scheduler import Scheduler, SchedulerConfig
from vlserve.errors import ContextLengthError, OverloadedError


@dataclass(eq=False)
class Seq:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int = 10


def _sched(**kw: int) -> Scheduler[Seq]:
    return Scheduler(SchedulerConfig(**kw))


def test_fifo_admission_up_to_max_num_seqs() -> None:
    s = _sched(max_num_seqs=2)
    seqs = [Seq(f"r{i}", 5) for i in range(4)]
    for q in seqs:
        s.add(q)
    plan = s.schedule()
    assert plan.admitted == seqs[:2] and plan.running == seqs[:2]
    assert s.schedule().admitted == []  # full
    s.finish([seqs[0]])
    assert s.schedule().admitted == [seqs[2]]
    assert s.running == [seqs[1], seqs[2]]


def test_token_budget_is_respected_and_released() -> None:
    s = _sched(max_num_batched_tokens=100)
    a, b = Seq("a", 40, 20), Seq("b", 30, 20)
    s.add(a)
    s.add(b)
    assert s.schedule().admitted == [a]  # 60 reserved; b needs 50 more
    assert s.reserved_tokens == 60
    s.finish([a])
    assert s.reserved_tokens == 0
    assert s.schedule().admitted == [b]


def test_budget_counts_the_padded_footprint() -> None:
    s = _sched(max_num_batched_tokens=100, max_num_seqs=8)
    long, short = Seq("long", 40, 10), Seq("short", 5, 5)
    s.add(long)
    s.add(short)
    # 60 real tokens, but the cache pads every row to the longest (50): 2 x 50 = 100 fits
    assert s.schedule().admitted == [long, short]
    assert s.reserved_tokens == 100
    third = Seq("third", 1, 1)
    s.add(third)
    assert s.schedule().admitted == []  # 3 x 50 > 100 although only 62 tokens are real
    s.finish([long])
    assert s.reserved_tokens == 10
    assert s.schedule().admitted == [third]


def test_long_prompt_is_not_starved_by_short_ones() -> None:
    s = _sched(max_num_batched_tokens=100, max_num_seqs=8)
    first = Seq("short0", 10, 10)
    s.add(first)
    s.schedule()
    long = Seq("long", 80, 10)  # does not fit next to `first` (20 + 90 > 100)
    s.add(long)
    shorts = [Seq(f"short{i}", 10, 10) for i in range(1, 4)]
    for q in shorts:
        s.add(q)
    assert s.schedule().admitted == []  # nobody overtakes the long prompt
    s.finish([first])
    assert s.schedule().admitted == [long]


def test_prefill_tokens_per_step_but_always_one() -> None:
    s = _sched(max_prefill_tokens=50)
    big, small = Seq("big", 500, 1), Seq("small", 10, 1)
    s.add(big)
    s.add(small)
    assert s.schedule().admitted == [big]  # alone over the cap, but admitted
    assert s.schedule().admitted == [small]


def test_queue_limit_gives_overloaded() -> None:
    s = _sched(max_queue=2)
    s.add(Seq("a", 1))
    s.add(Seq("b", 1))
    with pytest.raises(OverloadedError) as info:
        s.add(Seq("c", 1))
    assert info.value.status == 429 and info.value.retry_after_s >= 1


def test_request_that_can_never_fit_is_refused_at_once() -> None:
    s = _sched(max_num_batched_tokens=100)
    with pytest.raises(ContextLengthError):
        s.add(Seq("huge", 95, 10))
    assert s.num_waiting == 0


def test_finish_removes_waiting_requests_too() -> None:
    s = _sched(max_num_seqs=1)
    a, b = Seq("a", 1), Seq("b", 1)
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish([b])  # cancelled while waiting
    assert s.num_waiting == 0 and s.running == [a]
    assert s.has_work()
    s.finish([a])
    assert not s.has_work()


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens"])
def test_config_validation(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: 0})
