"""Which rates `vlserve bench --sweep` measures, and which pass: pure, no I/O.

The search (no ``--sweep-rates``) is pure and depends only on the set of rates measured so far,
so a resumed sweep asks for the same rates again and finds them done:

1. explore: ``start``, ``start x factor``, … until a rate fails (or down by ``factor`` while the
   lowest rate fails);
2. bisect between the highest passing rate and the lowest failing one above it, until the
   failing one is within ``precision`` of the passing one;
3. never more than ``max_runs`` runs.

A rate passes when at least 90% of its requests succeed, the server keeps up (``keep_up_ratio``
at least ``KEEP_UP``: past saturation completions stop growing with arrivals) and, with
``--goodput``, at least ``slo_attainment`` of the requests meet every SLO.

The headline is the achieved rate of the highest passing rate (what the server sustained), not
the offered one. A rate that ran too briefly to trust (``too_brief``) is flagged in the table, the
log and the files, since its verdict and its throughput are within noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlserve.bench.app import MIN_SUCCESS_RATE
from vlserve.bench.client import RequestResult
from vlserve.bench.config import SweepConfig

KEEP_UP = 0.9  # completion rate below this fraction of the arrival rate: saturated
# Too brief to trust, both sized to the 10% that the keep-up margin and --sweep-precision resolve:
# a Poisson count of n arrivals has a relative spread of 1/sqrt(n), 10% at 100 requests; and in a
# run of D seconds whose requests take L seconds each, about L/D of it is ramp-up or drain, 10%
# once it lasts 10 mean E2E latencies.
MIN_COMPLETED = 100
MIN_LATENCIES = 10
MIN_RATE = 1e-3  # exploring downward stops here


@dataclass(frozen=True)
class RatePoint:
    """What the search needs from one rate's run; ``record`` is the full sweep line."""

    rate: float  # offered, requests/s
    achieved: float  # successful requests/s
    success_rate: float  # percent
    slo_attainment: float | None = None  # fraction meeting every SLO; None without --goodput
    keep_up: float | None = None  # keep_up_ratio; None: judged by achieved / rate
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RatePoint:
        return cls(
            rate=float(record["request_rate"]),
            achieved=float(record["request_throughput"] or 0.0),
            success_rate=float(record["success_rate"]),
            slo_attainment=record.get("slo_attainment"),
            keep_up=record.get("keep_up_ratio"),
            record=record,
        )


def too_brief(record: dict[str, Any]) -> str | None:
    """Why a sweep line's run was too brief to trust, or None (see MIN_COMPLETED)."""
    completed = int(record.get("completed") or 0)
    duration = float(record.get("duration_s") or 0.0)
    mean_e2el_s = float(record.get("mean_e2el_ms") or 0.0) / 1000.0
    reasons = []
    if completed < MIN_COMPLETED:
        reasons.append(f"{completed} completed requests (want >= {MIN_COMPLETED})")
    if mean_e2el_s and duration < MIN_LATENCIES * mean_e2el_s:
        reasons.append(
            f"{duration:.3g} s, under {MIN_LATENCIES} mean E2E latencies of {mean_e2el_s:.3g} s"
        )
    return "; ".join(reasons) or None


def rate_key(rate: float) -> str:
    """How a rate is named in file names and matched on resume."""
    return f"{rate:.4g}"


def round_rate(rate: float) -> float:
    return float(f"{rate:.3g}")


def passes(point: RatePoint, sweep: SweepConfig) -> bool:
    """Enough successes, the server keeps up with the offered rate, and the SLOs are attained."""
    keep_up = point.achieved / point.rate if point.keep_up is None else point.keep_up
    if point.success_rate < MIN_SUCCESS_RATE or keep_up < KEEP_UP:
        return False
    return point.slo_attainment is None or point.slo_attainment >= sweep.slo_attainment


def keep_up_ratio(results: Sequence[RequestResult]) -> float | None:
    """Completion rate over arrival rate, each over its own span, so neither the start nor the
    drain of a short run biases it: about 1 while the server keeps up, capacity / offered past
    saturation (arrivals are the scheduled ones, so client-side queueing counts too). First
    attempts of single requests or first turns only; None with fewer than 3."""
    firsts = [r for r in results if r.turn in (None, 0) and not r.skipped and not r.retry_count]
    due = sorted(r.sent_at_s - r.queued_s for r in firsts)
    ends = sorted(r.sent_at_s + r.latency_s for r in firsts if r.success)
    if len(ends) < 3 or due[-1] <= due[0] or ends[-1] <= ends[0]:
        return None
    arrivals = (len(due) - 1) / (due[-1] - due[0])
    completions = (len(ends) - 1) / (ends[-1] - ends[0])
    return round(completions / arrivals, 3)


def next_rate(points: Sequence[RatePoint], sweep: SweepConfig) -> float | None:
    """The next rate to measure, or None when the sweep is done (pure: a function of the set)."""
    done = {rate_key(p.rate) for p in points}
    if sweep.rates:
        return next((r for r in sweep.rates if rate_key(r) not in done), None)
    if not points:
        return sweep.start_rate
    if len(points) >= sweep.max_runs:
        return None
    passing = [p.rate for p in points if passes(p, sweep)]
    failing = [p.rate for p in points if not passes(p, sweep)]
    if not passing:
        candidate = round_rate(min(failing) / sweep.factor)
        return None if candidate < MIN_RATE or rate_key(candidate) in done else candidate
    lo = max(passing)
    above = [r for r in failing if r > lo]
    if not above:
        candidate = round_rate(max(p.rate for p in points) * sweep.factor)
    else:
        hi = min(above)
        if hi <= lo * (1 + sweep.precision):
            return None
        candidate = round_rate((lo + hi) / 2)
    return None if rate_key(candidate) in done else candidate


def drive(
    sweep: SweepConfig, run: Callable[[float], RatePoint | None]
) -> tuple[list[RatePoint], bool]:
    """Measure rates until ``next_rate`` says done; (points in run order, interrupted)."""
    points: list[RatePoint] = []
    while (rate := next_rate(points, sweep)) is not None:
        point = run(rate)
        if point is None:
            return points, True
        points.append(point)
    return points, False


def best_point(points: Sequence[RatePoint], sweep: SweepConfig) -> RatePoint | None:
    """The highest rate that passed."""
    return max((p for p in points if passes(p, sweep)), key=lambda p: p.rate, default=None)
