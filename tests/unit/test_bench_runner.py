"""Pure scheduling logic: endpoint routing, arrival processes, request plans."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from vlserve.bench.config import LoadConfig
from vlserve.bench.dataset import BenchRequest
from vlserve.bench.runner import (
    EndpointRouter,
    arrival_offsets,
    plan_requests,
    warmup_requests,
)


def test_round_robin_is_strict_and_independent_of_ids() -> None:
    # The prototype used hash(id) % n: unbalanced, and different on every run (hash seeds).
    router = EndpointRouter(3, "round-robin")
    picks = []
    for _ in range(9):
        picks.append(router.acquire())
    assert picks == [0, 1, 2] * 3


def test_least_outstanding_picks_the_least_busy_and_breaks_ties_in_turn() -> None:
    router = EndpointRouter(3, "least-outstanding")
    assert [router.acquire() for _ in range(3)] == [0, 1, 2]
    router.release(1)
    assert router.acquire() == 1
    router.release(0)
    router.release(2)
    assert router.acquire() == 2  # 0 and 2 tie; the turn is after 1
    assert router.acquire() == 0
    assert router.outstanding == [1, 1, 1]


def gaps(load: LoadConfig, n: int) -> list[float]:
    times = list(itertools.islice(arrival_offsets(load, random.Random(7)), n + 1))
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_poisson_arrivals_have_the_rate_and_unit_cv() -> None:
    g = gaps(LoadConfig(request_rate=20.0), 20000)
    assert math.isclose(1 / statistics.fmean(g), 20.0, rel_tol=0.03)
    assert math.isclose(statistics.pstdev(g) / statistics.fmean(g), 1.0, rel_tol=0.05)


def test_burstiness_changes_the_cv_not_the_rate() -> None:
    for burstiness in (0.25, 4.0):
        g = gaps(LoadConfig(request_rate=10.0, burstiness=burstiness), 20000)
        assert math.isclose(1 / statistics.fmean(g), 10.0, rel_tol=0.05)
        cv = statistics.pstdev(g) / statistics.fmean(g)
        assert math.isclose(cv, 1 / math.sqrt(burstiness), rel_tol=0.08)


def test_constant_and_unlimited_arrivals() -> None:
    assert gaps(LoadConfig(request_rate=4.0, arrival="constant"), 3) == [0.25] * 3
    assert gaps(LoadConfig(), 3) == [0.0] * 3


def test_ramp_up_spreads_the_first_users_then_keeps_the_arrival_process() -> None:
    closed = LoadConfig(max_concurrency=4, ramp_up_s=2.0)
    assert list(itertools.islice(arrival_offsets(closed, random.Random(0)), 6)) == [
        0.0, 0.5, 1.0, 1.5, 0.0, 0.0  # then each request goes as soon as a slot frees
    ]  # fmt: skip
    paced = LoadConfig(max_concurrency=2, ramp_up_s=1.0, request_rate=1.0, arrival="constant")
    assert list(itertools.islice(arrival_offsets(paced, random.Random(0)), 4)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--ramp-up"):
        LoadConfig(ramp_up_s=-1)


def requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(f"q{i}", [{"role": "user", "content": "x"}], "test") for i in range(n)]


def test_plan_sends_each_once_by_default_and_cycles_with_stable_unique_ids() -> None:
    assert [rid for rid, _ in plan_requests(requests(3), LoadConfig())] == ["q0", "q1", "q2"]
    ids = [rid for rid, _ in plan_requests(requests(2), LoadConfig(num_requests=5))]
    assert ids == ["q0", "q1", "q0@1", "q1@1", "q0@2"]
    endless = plan_requests(requests(2), LoadConfig(duration_s=1.0))
    assert len(list(itertools.islice(endless, 100))) == 100
    assert list(plan_requests([], LoadConfig(num_requests=3))) == []


def test_warm_up_uses_requests_the_timed_run_never_sends(caplog: pytest.LogCaptureFixture) -> None:
    """A server's prefix and media caches must not have seen a timed request in the warm-up."""
    data = requests(5)
    warm = warmup_requests(data, LoadConfig(num_requests=3, warmup=2))
    timed = [r for _, r in plan_requests(data, LoadConfig(num_requests=3))]
    assert [r.id for r in warm] == ["q3", "q4"]
    assert not {r.id for r in warm} & {r.id for r in timed}
    assert "repeats timed requests" not in caplog.text
    assert warmup_requests(data, LoadConfig(num_requests=3)) == []


@pytest.mark.parametrize(
    "load",
    [
        LoadConfig(warmup=2),  # the dataset once: all of it is timed
        LoadConfig(num_requests=4, warmup=2),  # one spare, two wanted
        LoadConfig(duration_s=5.0, warmup=2),  # cycled for a duration
    ],
)
def test_without_a_surplus_the_warm_up_repeats_and_says_so(
    load: LoadConfig, caplog: pytest.LogCaptureFixture
) -> None:
    warm = warmup_requests(requests(5), load)
    assert len(warm) == 2
    assert "repeats timed requests" in caplog.text
