"""`vlserve bench --sweep`: one workload at a series of request rates, for capacity planning.

Each rate is an ordinary run (``app.run_dataset``) with its own results and summary files; the
sweep keeps one line per measured rate in ``<output>.sweep.jsonl`` (what ``--resume`` reuses),
then writes ``<output>.sweep.json``, the table and ``<output>.sweep.png``.

Each rate sends requests no earlier rate sent, where it can: ``--dataset random`` is drawn anew for
each rate, from a seed of that rate's own (so a resumed sweep draws the same again). Otherwise a
server's prefix and media caches would answer later rates partly from what earlier rates sent,
and its capacity would look higher than it is. A dataset from files is the same at every rate,
and the sweep says so.

Which rates it measures, and which pass: ``bench/rate_search.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlserve.bench.app import jsonable, run_dataset
from vlserve.bench.config import BenchConfig, OutputConfig, SweepConfig
from vlserve.bench.dataset import Dataset, load_dataset
from vlserve.bench.fastjson import dumps_line
from vlserve.bench.rate_search import (
    KEEP_UP,
    MIN_COMPLETED,
    MIN_LATENCIES,
    RatePoint,
    best_point,
    drive,
    keep_up_ratio,
    passes,
    rate_key,
    too_brief,
)
from vlserve.bench.report import _ends_with_newline, format_sweep_table, write_summary

log = logging.getLogger("vlserve.bench")

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "queued")


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
