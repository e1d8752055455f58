"""`vlserve bench --sweep`: one workload at a series of request rates, for capacity planning.

Each rate is an ordinary run (``app.run_dataset``) with its own results and summary files; the
sweep keeps one line per measured rate in ``<output>.sweep.jsonl`` (what ``--resume`` reuses),
then writes ``<output>.sweep.json``, the table and ``<output>.sweep.png``.

The search (no ``--sweep-rates``) is pure and depends only on the set of rates measured so far,
so a resumed sweep asks for the same rates again and finds them done:

1. explore: ``start``, ``start x factor``, … until a rate fails (or down by ``factor`` while the
   lowest rate fails);
2. bisect between the highest passing rate and the lowest failing one above it, until the
   failing one is within ``precision`` of the passing one;
3. never more than ``max_runs`` runs.

Each rate sends requests no earlier rate sent, where it can: ``--dataset random`` is drawn anew for
each rate, from a seed of that rate's own (so a resumed sweep draws the same again). Otherwise a
server's prefix and media caches would answer later rates partly from what earlier rates sent,
and its capacity would look higher than it is. A dataset from files is the same at every rate,
and the sweep says so.

A rate passes when at least 90% of its requests succeed, the server keeps up (``keep_up_ratio``
at least ``KEEP_UP``: past saturation completions stop growing with arrivals) and, with
``--goodput``, at least ``slo_attainment`` of the requests meet every SLO.

The headline is the achieved rate of the highest passing rate (what the server sustained), not
the offered one. A rate that ran too briefly to trust (``too_brief``) is flagged in the table, the
log and the files, since its verdict and its throughput are within noise.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlserve.bench.app import MIN_SUCCESS_RATE, jsonable, run_dataset
from vlserve.bench.client import RequestResult
from vlserve.bench.config import BenchConfig, OutputConfig, SweepConfig
from vlserve.bench.dataset import Dataset, load_dataset
from vlserve.bench.fastjson import dumps_line
from vlserve.bench.report import _ends_with_newline, format_sweep_table, write_summary

log = logging.getLogger("vlserve.bench")

KEEP_UP = 0.9  # completion rate below this fraction of the arrival rate: saturated
# Too brief to trust, both sized to the 10% that the keep-up margin and --sweep-precision resolve:
# a Poisson count of n arrivals has a relative spread of 1/sqrt(n), 10% at 100 requests; and in a
# run of D seconds whose requests take L seconds each, about L/D of it is ramp-up or drain, 10%
# once it lasts 10 mean E2E latencies.
MIN_COMPLETED = 100
MIN_LATENCIES = 10
MIN_RATE = 1e-3  # exploring downward stops here
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "queued")


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


@dataclass(frozen=True)
class SweepPaths:
    """``<stem>.rate-R.jsonl`` per rate (with its summary and plots), ``<stem>.sweep.*``."""

    stem: Path
    summary: Path

    @classmethod
    def of(cls, out: OutputConfig) -> SweepPaths:
        stem = out.results_path.with_name(out.results_path.name.removesuffix(".jsonl"))
        return cls(stem, out.summary_path or cls._named(stem, "sweep.json"))

    @staticmethod
    def _named(stem: Path, suffix: str) -> Path:
        return stem.with_name(f"{stem.name}.{suffix}")

    def rate_results(self, rate: float) -> Path:
        return self._named(self.stem, f"rate-{rate_key(rate)}.jsonl")

    @property
    def lines(self) -> Path:
        return self._named(self.stem, "sweep.jsonl")

    @property
    def plot(self) -> Path:
        return self._named(self.stem, "sweep.png")


def workload_fingerprint(config: BenchConfig) -> str:
    """Everything but the rate and the outputs: a resumed sweep reuses only lines of the same
    workload, against the same endpoints, with the same SLOs."""
    data = jsonable(dataclasses.asdict(config))
    data["load"].pop("request_rate")
    data["output"] = {"goodput_slo_ms": data["output"]["goodput_slo_ms"]}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_done(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Rates already measured in ``path`` for this workload (``--resume``), by ``rate_key``."""
    done: dict[str, dict[str, Any]] = {}
    other = 0
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the half line of a killed sweep
            if not isinstance(record, dict) or "request_rate" not in record:
                continue
            if record.get("fingerprint") != fingerprint:
                other += 1
                continue
            done[rate_key(float(record["request_rate"]))] = record
    if other:
        log.warning("%s: %d line(s) of another workload or SLO set ignored", path, other)
    return done


def append_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write(b"\n")
        f.write(dumps_line(record))


def point_record(
    rate: float,
    summary: dict[str, Any],
    keep_up: float | None,
    results: Path,
    fingerprint: str,
) -> dict[str, Any]:
    """One sweep line, with the names of vLLM's ``bench serve`` results where they exist."""
    goodput = summary.get("goodput")
    total = summary["total_requests"]
    record: dict[str, Any] = {
        "request_rate": rate,
        "completed": summary["successful"],
        "failed": summary["failed"],
        "success_rate": summary["success_rate"],
        "duration_s": summary["duration_s"],
        "request_throughput": summary["request_throughput"],
        "output_throughput": summary["output_token_throughput"],
        "total_token_throughput": summary["total_token_throughput"],
        "request_goodput": goodput["request_throughput"] if goodput else None,
        "slo_attainment": round(goodput["requests"] / total, 4) if goodput and total else None,
        "keep_up_ratio": keep_up,
    }
    for metric in LATENCY_METRICS:
        stats = summary[f"{metric}_ms"]
        for name, key in (("mean", "mean"), ("median", "median"), ("p99", "p99")):
            record[f"{name}_{metric}_ms"] = stats.get(key)
    mean_e2el = record["mean_e2el_ms"]
    # Little's law, as guidellm reports concurrency: requests/s x seconds per request.
    record["mean_concurrency"] = (
        round(summary["request_throughput"] * mean_e2el / 1000.0, 2) if mean_e2el else None
    )
    record["max_concurrency_reached"] = summary.get("max_concurrency_reached")
    record["results"] = str(results)
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    record["fingerprint"] = fingerprint
    record["too_brief"] = too_brief(record)
    return record


def rate_dataset(config: BenchConfig, rate: float) -> Dataset:
    """The synthetic dataset of the run at ``rate``: drawn from a seed of that rate's own."""
    offset = int.from_bytes(hashlib.sha256(rate_key(rate).encode()).digest()[:4], "big")
    return load_dataset(dataclasses.replace(config.dataset, seed=config.dataset.seed + offset))


def measure(
    config: BenchConfig, dataset: Dataset | None, rate: float, paths: SweepPaths, fingerprint: str
) -> dict[str, Any] | None:
    """One run at ``rate`` from scratch (a rate's numbers come from one uninterrupted run) of
    ``dataset``, or with None of the rate's own synthetic one; None when interrupted."""
    out = config.output
    rate_config = dataclasses.replace(
        config,
        load=dataclasses.replace(config.load, request_rate=rate),
        output=dataclasses.replace(
            out,
            results_path=paths.rate_results(rate),
            summary_path=None,
            resume=False,
            percentiles=tuple(sorted({*out.percentiles, 50.0, 99.0})),
        ),
    )
    log.info("sweep: offered rate %s req/s -> %s", rate_key(rate), rate_config.output.results_path)
    requests = dataset if dataset is not None else rate_dataset(config, rate)
    report = run_dataset(rate_config, requests, print_table=False)
    if report.exit_code == 130 or report.summary is None or report.outcome is None:
        return None
    keep_up = keep_up_ratio(report.outcome.results)
    path = rate_config.output.results_path
    return point_record(rate, report.summary, keep_up, path, fingerprint)


def sweep_summary(
    config: BenchConfig, sweep: SweepConfig, points: Sequence[RatePoint], interrupted: bool
) -> dict[str, Any]:
    # too_brief again: lines written before it existed (--resume) get it too
    rows = [
        {**p.record, "passed": passes(p, sweep), "too_brief": too_brief(p.record)}
        for p in sorted(points, key=lambda p: p.rate)
    ]
    best = best_point(points, sweep)
    peak = max(points, key=lambda p: p.achieved, default=None)
    return {
        "mode": "rates" if sweep.rates else "search",
        "sweep": jsonable(dataclasses.asdict(sweep)),
        "keep_up_fraction": KEEP_UP,
        "goodput_slo_ms": dict(config.output.goodput_slo_ms),
        "runs": len(points),
        "interrupted": interrupted,
        "best_rate": best.rate if best else None,
        "best_request_throughput": best.achieved if best else None,
        "best": {**best.record, "passed": True, "too_brief": too_brief(best.record)}
        if best
        else None,
        "too_brief_rates": [row["request_rate"] for row in rows if row["too_brief"]],
        "min_completed": MIN_COMPLETED,
        "min_latencies": MIN_LATENCIES,
        "max_request_throughput": peak.achieved if peak else None,
        "max_request_throughput_rate": peak.rate if peak else None,
        "points": rows,
        "config": jsonable(dataclasses.asdict(config)),
    }


def run_sweep(config: BenchConfig, sweep: SweepConfig) -> int:
    """``vlserve bench --sweep``: 0 when some rate passed, 1 when none did (or no data), 130 when
    interrupted."""
    dataset = None  # synthetic: drawn for each rate
    if config.dataset.kind != "random":
        dataset = load_dataset(config.dataset)
        if not dataset.requests:
            log.error("no requests to send (%d line(s) skipped)", len(dataset.issues))
            return 1
        log.warning(
            "every rate sends the same %d requests: a server with prefix or media caches may "
            "answer later rates partly from earlier ones (restart it between rates, or use "
            "--dataset random, which is drawn anew for each rate)",
            len(dataset.requests),
        )
    paths = SweepPaths.of(config.output)
    fingerprint = workload_fingerprint(config)
    done = load_done(paths.lines, fingerprint) if config.output.resume else {}
    if not config.output.resume:
        paths.lines.unlink(missing_ok=True)

    def run(rate: float) -> RatePoint | None:
        record = done.get(rate_key(rate))
        if record is not None:
            log.info("sweep: rate %s req/s already measured in %s", rate_key(rate), paths.lines)
        else:
            record = measure(config, dataset, rate, paths, fingerprint)
            if record is None:
                return None
            append_line(paths.lines, record)
        point = RatePoint.from_record(record)
        log.info(
            "sweep: rate %s req/s: achieved %.3g req/s, %s",
            rate_key(rate),
            point.achieved,
            "passed" if passes(point, sweep) else "failed",
        )
        if brief := too_brief(record):
            log.warning(
                "sweep: rate %s req/s ran too briefly to trust: %s; raise --num-requests or "
                "--duration",
                rate_key(rate),
                brief,
            )
        return point

    points, interrupted = drive(sweep, run)
    summary = sweep_summary(config, sweep, points, interrupted)
    write_summary(summary, paths.summary)
    print(format_sweep_table(summary), flush=True)
    log.info("sweep: %s, %s", paths.lines, paths.summary)
    if config.output.plots and points:
        from vlserve.bench.plots import write_sweep_plot

        if write_sweep_plot(summary["points"], paths.plot) is not None:
            log.info("plot: %s", paths.plot)
    if interrupted:
        return 130
    return 0 if summary["best"] else 1
