"""`--sweep`: the rate search and bisection (pure, with fake runs), the keep-up ratio, flags."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from vlserve.bench import cli
from vlserve.bench.client import RequestResult
from vlserve.bench.config import BenchConfig, SweepConfig
from vlserve.bench.rate_search import RatePoint, best_point, drive, keep_up_ratio, next_rate, passes


def server(capacity: float, slo_limit: float = float("inf")):
    """A fake run: achieved = min(rate, capacity); SLOs met below ``slo_limit`` only."""

    def run(rate: float) -> RatePoint:
        attainment = 1.0 if rate <= slo_limit else 0.5
        return RatePoint(rate, min(rate, capacity), 100.0, attainment, min(1.0, capacity / rate))

    return run


def rates(points: list[RatePoint]) -> list[float]:
    return [p.rate for p in points]


def test_explores_up_to_saturation_then_bisects() -> None:
    sweep = SweepConfig()
    points, interrupted = drive(sweep, server(capacity=10))
    # 16 offered, 10 achieved: saturated; then bisect between 8 and 16 to within 10%.
    assert rates(points) == [1, 2, 4, 8, 16, 12, 10, 11]
    assert not interrupted
    best = best_point(points, sweep)
    assert best is not None and best.rate == 11  # 12 failed, and 12 <= 11 x 1.1


def test_bisects_for_the_highest_rate_meeting_the_slos() -> None:
    sweep = SweepConfig(precision=0.05)
    points, _ = drive(sweep, server(capacity=1000, slo_limit=5.3))
    best = best_point(points, sweep)
    assert best is not None and 5.3 / 1.05 <= best.rate <= 5.3
    assert rates(points)[:4] == [1, 2, 4, 8] and len(points) <= sweep.max_runs


def test_attainment_threshold_decides() -> None:
    point = RatePoint(4, 4, 100.0, slo_attainment=0.85, keep_up=1.0)
    assert not passes(point, SweepConfig())
    assert passes(point, SweepConfig(slo_attainment=0.8))
    assert not passes(RatePoint(4, 4, 80.0, None, 1.0), SweepConfig())  # < 90% succeeded
    assert not passes(RatePoint(4, 3, 100.0), SweepConfig())  # no ratio: achieved / offered


def test_max_runs_bounds_a_server_that_never_saturates() -> None:
    sweep = SweepConfig(max_runs=5, start_rate=0.5, factor=3)
    points, _ = drive(sweep, server(capacity=float("inf")))
    assert rates(points) == [0.5, 1.5, 4.5, 13.5, 40.5]


def test_a_failing_start_rate_explores_downward() -> None:
    sweep = SweepConfig()
    points, _ = drive(sweep, server(capacity=0.3))
    assert rates(points)[:3] == [1, 0.5, 0.25]
    best = best_point(points, sweep)
    # Passing means keeping up with 90% of the offered rate (KEEP_UP), within 10% (precision).
    assert best is not None and 0.3 / 1.1 <= best.rate <= 0.3 / 0.9


def test_given_rates_run_in_order_once_whatever_max_runs() -> None:
    sweep = SweepConfig(rates=(4, 1, 4, 2), max_runs=1)
    points, _ = drive(sweep, server(capacity=3))
    assert rates(points) == [4, 1, 2]
    best = best_point(points, sweep)
    assert best is not None and best.rate == 2


def test_next_rate_depends_only_on_the_set_measured_so_far() -> None:
    """What makes a resumed sweep ask for the rates it already has, in any file order."""
    sweep = SweepConfig()
    points, _ = drive(sweep, server(capacity=7, slo_limit=6))
    shuffle = random.Random(0).shuffle
    for k in range(len(points) + 1):
        prefix = points[:k]
        shuffle(prefix)
        expected = points[k].rate if k < len(points) else None
        assert next_rate(prefix, sweep) == expected


def test_an_interrupted_run_stops_the_sweep() -> None:
    calls: list[float] = []

    def run(rate: float) -> RatePoint | None:
        calls.append(rate)
        return None if rate == 4 else server(100)(rate)

    points, interrupted = drive(SweepConfig(), run)
    assert interrupted and rates(points) == [1, 2] and calls == [1, 2, 4]


def result(due: float, latency: float, ok: bool = True, queued: float = 0.0) -> RequestResult:
    r = RequestResult("x", "x", success=ok, latency_s=latency)
    r.sent_at_s, r.queued_s = due + queued, queued
    return r


def test_keep_up_ratio_ignores_start_and_drain_but_sees_queueing() -> None:
    # 20 arrivals 0.1 s apart, 2 s latency each: achieved req/s over the run would be 20/3.9,
    # half the arrival rate, yet the server keeps up.
    keeping_up = [result(0.1 * i, 2.0) for i in range(20)]
    assert keep_up_ratio(keeping_up) == pytest.approx(1.0)
    # Completions only every 0.2 s (client-side queueing behind a concurrency cap): half.
    saturated = [result(0.1 * i, 0.05, queued=0.1 * i) for i in range(20)]
    assert keep_up_ratio(saturated) == pytest.approx(0.5)
    assert keep_up_ratio(keeping_up[:2]) is None


def sweep_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--input", "x", *argv])


def sweep_of(*argv: str) -> SweepConfig | None:
    return cli.sweep_from_flags(cli.build_flags(sweep_args(*argv), {}))


def test_sweep_flags() -> None:
    assert sweep_of() is None
    assert sweep_of("--sweep") == SweepConfig()
    sweep = sweep_of("--sweep-rates", "1, 2.5,8", "--slo-attainment", "0.95")
    assert sweep == SweepConfig(rates=(1.0, 2.5, 8.0), slo_attainment=0.95)


@pytest.mark.parametrize(
    "argv",
    [
        ["--sweep", "--request-rate", "3"],
        ["--sweep", "--rate-limit", "3"],
        ["--sweep-rates", "1,x"],
        ["--sweep-rates", "0,1"],
        ["--sweep", "--sweep-factor", "1"],
        ["--sweep", "--slo-attainment", "1.5"],
    ],
)
def test_bad_sweep_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(sweep_args(*argv)) == 2
    assert "vlserve bench: error:" in capsys.readouterr().err


def _texts(config: BenchConfig, rate: float) -> list[str]:
    from vlserve.bench.sweep import rate_dataset

    return [str(r.messages) for r in rate_dataset(config, rate).requests]


def test_each_rate_draws_its_own_synthetic_requests_the_same_on_resume() -> None:
    """A caching server must not answer one rate from what an earlier rate sent."""
    config = cli.config_from_args(
        sweep_args("--dataset", "random", "--random-input-len", "8", "--num-requests", "5")
    )
    first, second = _texts(config, 2.0), _texts(config, 4.0)
    assert len(first) == len(second) == 5
    assert not set(first) & set(second)
    assert _texts(config, 2.0) == first  # a resumed sweep draws the same again
    assert _texts(config, 2.00001) == first  # the rate as named in files and on resume


def sweep_line(rate: float, achieved: float, completed: int, duration_s: float, e2el_ms: float):
    """A sweep line as point_record writes it (the fields the verdict and the table read)."""
    from vlserve.bench.sweep import point_record

    summary = {
        "successful": completed, "failed": 0, "total_requests": completed, "success_rate": 100.0,
        "duration_s": duration_s, "request_throughput": achieved,
        "output_token_throughput": 10 * achieved, "total_token_throughput": 20 * achieved,
        **{f"{m}_ms": {"mean": e2el_ms, "median": e2el_ms, "p99": e2el_ms}
           for m in ("ttft", "tpot", "itl", "e2el", "queued")},
    }  # fmt: skip
    return point_record(rate, summary, 1.0, Path("r.jsonl"), "fp")


def test_too_brief_needs_a_hundred_requests_over_ten_latencies() -> None:
    from vlserve.bench.rate_search import too_brief

    # The review's case: about 3 s at 22 req/s.
    short = sweep_line(22, 13.4, completed=40, duration_s=3.0, e2el_ms=800)
    assert short["too_brief"] is not None and "40 completed requests" in short["too_brief"]
    assert "under 10 mean E2E latencies" in short["too_brief"]
    assert sweep_line(4, 4, completed=240, duration_s=60, e2el_ms=1000)["too_brief"] is None
    slow = too_brief({"completed": 500, "duration_s": 20.0, "mean_e2el_ms": 4000.0})
    assert slow is not None and "completed" not in slow
    assert too_brief({"completed": 100, "duration_s": 10.0, "mean_e2el_ms": None}) is None


def test_the_headline_is_the_achieved_rate_and_brief_rates_are_flagged() -> None:
    from vlserve.bench.report import format_sweep_table
    from vlserve.bench.sweep import sweep_summary

    sweep = SweepConfig(rates=(11, 22))
    points = [
        RatePoint.from_record(sweep_line(11, 10.9, completed=600, duration_s=55, e2el_ms=500)),
        RatePoint.from_record(sweep_line(22, 13.4, completed=40, duration_s=3.0, e2el_ms=800)),
    ]
    config = cli.config_from_args(sweep_args("--dataset", "random"))
    summary = sweep_summary(config, sweep, points, interrupted=False)
    assert summary["best_rate"] == 22 and summary["best_request_throughput"] == 13.4
    assert summary["too_brief_rates"] == [22]
    assert [bool(p["too_brief"]) for p in summary["points"]] == [False, True]
    table = format_sweep_table(summary)
    (headline,) = [line for line in table.splitlines() if line.startswith("Sustained")]
    # The achieved rate comes first; the offered one only as where it was reached.
    assert headline.index("13.40 req/s achieved") < headline.index("22 req/s")
    assert "too brief to trust" in headline
    rows = {line.split()[0]: line for line in table.splitlines() if line[:8].strip()[:1].isdigit()}
    assert rows["22.00"].endswith(" *") and not rows["11.00"].endswith("*")
    assert "* ran too briefly to trust (1 of 2 rates" in table
