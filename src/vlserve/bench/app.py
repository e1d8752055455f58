"""A whole benchmark run: dataset → runner → results JSONL, summary JSON, table, plots → exit code."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlserve.bench.client import RequestResult
from vlserve.bench.config import BenchConfig
from vlserve.bench.dataset import Dataset, load_dataset, media_per_request
from vlserve.bench.metrics import endpoint_breakdown, summarize
from vlserve.bench.progress import Progress
from vlserve.bench.report import ResultsWriter, completed_ids, format_table, write_summary
from vlserve.bench.runner import RunOutcome, pending_plan, run_benchmark

log = logging.getLogger("vlserve.bench")

MIN_SUCCESS_RATE = 90.0  # below it the exit code is 1, as in the prototype


def setup_logging(level: str, log_file: Path | None) -> None:
    """Logs go to stderr (stdout carries the table); to a file only when asked."""
    logger = logging.getLogger("vlserve")
    logger.setLevel(level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)


def run_config(config: BenchConfig) -> int:
    """Load the dataset, run, write every output; the exit code of ``vlserve bench``."""
    dataset = load_dataset(config.dataset)
    if not dataset.requests:
        log.error("no requests to send (%d line(s) skipped)", len(dataset.issues))
        return 1
    return run_dataset(config, dataset).exit_code


@dataclass
class RunReport:
    """How a run ended: its exit code, summary and outcome (None when there was nothing to send)."""

    exit_code: int
    summary: dict[str, Any] | None = None
    outcome: RunOutcome | None = None


def run_dataset(config: BenchConfig, dataset: Dataset, *, print_table: bool = True) -> RunReport:
    """One run of a loaded dataset: results JSONL, summary JSON, table (unless told not to),
    plots. Sweeps call it once per rate with the dataset loaded once."""
    out = config.output
    skip = completed_ids(out.results_path) if out.resume else set()
    planned = (  # requests to send: every turn of a conversation is one
        None
        if config.load.duration_s
        else sum(r.num_turns for _, r in pending_plan(dataset.requests, config.load, skip))
    )
    turns = sum(r.num_turns for r in dataset.requests)
    log.info(
        "%d %s from the dataset (%d lines skipped), %d already done, concurrency %d, endpoints %s",
        len(dataset.requests),
        "requests" if turns == len(dataset.requests) else f"conversations ({turns} turns)",
        len(dataset.issues),
        len(skip),
        config.load.max_concurrency,
        ", ".join(config.load.endpoints),
    )
    if planned == 0:
        log.info("every request already succeeded in %s: nothing to send", out.results_path)
        return RunReport(0)
    outcome, interrupted = _execute(config, dataset, skip, planned)
    summary = build_summary(
        config,
        outcome,
        dataset_size=len(dataset.requests),
        skipped_lines=len(dataset.issues),
        resumed=len(skip),
        media=media_per_request(dataset.requests),
    )
    write_summary(summary, out.resolved_summary_path)
    if print_table:
        print(format_table(summary), flush=True)
    log.info("results: %s, summary: %s", out.results_path, out.resolved_summary_path)
    if out.plots and outcome.results:
        from vlserve.bench.plots import write_plots

        prefix = out.results_path.with_name(out.results_path.name.removesuffix(".jsonl"))
        for path in write_plots(outcome.results, prefix):
            log.info("plot: %s", path)
    if interrupted:
        return RunReport(130, summary, outcome)
    code = 0 if summary["success_rate"] >= MIN_SUCCESS_RATE else 1
    return RunReport(code, summary, outcome)


def _execute(
    config: BenchConfig, dataset: Dataset, skip: set[str], planned: int | None
) -> tuple[RunOutcome, bool]:
    """Send the requests, writing each result as it ends; (outcome, interrupted by Ctrl-C)."""
    out = config.output
    progress = Progress(planned, enabled=out.progress)
    outcome = RunOutcome(endpoints=config.load.endpoints)
    started = time.perf_counter()
    interrupted = False
    with ResultsWriter(out.results_path, resume=out.resume) as writer:

        def sink(result: RequestResult) -> None:
            writer.write(result)
            outcome.results.append(result)
            progress.update(result)

        try:
            final = asyncio.run(run_benchmark(config, dataset.requests, sink, skip))
            outcome = dataclasses.replace(final, results=outcome.results)
        except KeyboardInterrupt:
            interrupted = True
            outcome.duration_s = time.perf_counter() - started
            log.warning("interrupted: %d results are in %s", len(outcome.results), out.results_path)
        progress.close()
    return outcome, interrupted


def build_summary(
    config: BenchConfig,
    outcome: RunOutcome,
    *,
    dataset_size: int,
    skipped_lines: int,
    resumed: int,
    media: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summarize() plus what was run, against what, and when."""
    out = config.output
    summary = summarize(outcome.results, outcome.duration_s, out.percentiles, out.goodput_slo_ms)
    summary["max_concurrency_reached"] = outcome.max_in_flight
    summary["endpoints"] = endpoint_breakdown(outcome.results, outcome.duration_s, out.percentiles)
    started = datetime.datetime.fromtimestamp(
        outcome.started_at or time.time(), datetime.timezone.utc
    )
    summary["run"] = {
        "started_at": started.isoformat(timespec="seconds"),
        "model": outcome.model,
        "stream": config.request.stream,
        "dataset_requests": dataset_size,
        "dataset_lines_skipped": skipped_lines,
        "resumed_ids_skipped": resumed,
        "dataset_media": media,  # images and videos per dataset request
        "config": jsonable(dataclasses.asdict(config)),
    }
    return summary


def jsonable(value: Any) -> Any:
    """A config as JSON: paths as strings, inf as \"inf\", never the API key."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if k != "api_key"}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, Path):
        return str(value)
    return value
