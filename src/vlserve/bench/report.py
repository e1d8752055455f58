"""Outputs of a run: the results JSONL (appended as requests end), the summary JSON, the table."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from vlserve.bench.client import RequestResult
from vlserve.bench.fastjson import dumps_line

log = logging.getLogger("vlserve.bench")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def result_record(result: RequestResult) -> dict[str, Any]:
    """One results line: the prototype's fields first (same names and meaning), then timings;
    in multi-turn runs, the conversation, the turn and whether it was skipped."""
    record = {
        "id": result.id,
        "request_id": result.request_id,
        "success": result.success,
        "response": result.response,
        "error": result.error,
        "latency": round(result.latency_s, 3),
        "tokens_used": result.total_tokens,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "retry_count": result.retry_count,
        "endpoint": result.endpoint,
        "http_status": result.http_status,
        "finish_reason": result.finish_reason,
        "ttft_ms": _ms(result.ttft_s),
        "tpot_ms": _ms(result.tpot_s),
        "e2el_ms": _ms(result.latency_s),
        "num_chunks": len(result.chunk_times_s),
        "itl_ms": [round(x * 1000.0, 3) for x in result.itl_s],
        "sent_at_s": round(result.sent_at_s, 6),
        "queued_ms": _ms(result.queued_s),
        "x_request_id": result.x_request_id,
        "video_tokens": result.video_tokens,  # null: no video, or a server that does not say
    }
    if result.conversation_id is not None:
        record["conversation_id"] = result.conversation_id
        record["turn"] = result.turn
        record["skipped"] = result.skipped
    return record


class ResultsWriter:
    """Appends one JSON line per finished request and flushes it: a crash loses nothing."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("ab" if resume else "wb")
        if resume and path.stat().st_size and not _ends_with_newline(path):
            self._file.write(b"\n")  # the killed run may have left half a line

    def write(self, result: RequestResult) -> None:
        self._file.write(dumps_line(result_record(result)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def completed_ids(path: Path) -> set[str]:
    """Request ids with a successful line in ``path`` (for ``--resume``); failed ones are re-sent."""
    done: set[str] = set()
    if not path.is_file():
        return done
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # e.g. the half line of a killed run
            if isinstance(record, dict) and record.get("success") and "request_id" in record:
                done.add(str(record["request_id"]))
    return done


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The console table: totals, throughputs, then one block per latency metric."""
    width = 60
    rows: list[tuple[str, Any]] = [
        ("Successful requests", summary["successful"]),
        ("Failed requests", summary["failed"]),
        ("Success rate (%)", summary["success_rate"]),
        ("Retries", summary["retries"]),
        ("Max concurrency reached", summary.get("max_concurrency_reached")),
        ("Duration (s)", summary["duration_s"]),
        ("Request throughput (req/s)", summary["request_throughput"]),
        ("Output token throughput (tok/s)", summary["output_token_throughput"]),
        ("Total token throughput (tok/s)", summary["total_token_throughput"]),
        ("Total prompt tokens", summary["total_prompt_tokens"]),
        ("Total completion tokens", summary["total_completion_tokens"]),
    ]
    if "goodput" in summary:
        rows.append(("Goodput (req/s)", summary["goodput"]["request_throughput"]))
    conversations = summary.get("conversations")
    if conversations:
        done = f"{conversations['completed']:,}/{conversations['total']:,}"
        rows.append(("Conversations completed", done))
        rows.append(("Turns skipped (earlier turn failed)", conversations["turns_skipped"]))
    lines = ["", " vlserve bench ".center(width, "="), *(_row(k, v, width) for k, v in rows)]
    if summary.get("usage_note"):
        lines.append(f"Note: {summary['usage_note']}")
    lines += _video_lines(summary, width)
    for key, title in (
        ("ttft_ms", "Time to first token"),
        ("tpot_ms", "Time per output token (excl. 1st)"),
        ("itl_ms", "Inter-token latency"),
        ("e2el_ms", "End-to-end latency"),
    ):
        lines += _stats_block(title, summary.get(key) or {}, " (ms)", width)
    if len(summary.get("turns") or ()) > 1:
        lines += _turn_lines(summary["turns"], width)
    endpoints = summary.get("endpoints") or {}
    if len(endpoints) > 1:
        lines.append(" Per endpoint ".center(width, "-"))
        for url, stats in endpoints.items():
            lines.append(
                f"{url}\n  ok {stats['successful']}/{stats['requests']}, "
                f"{_fmt(stats['request_throughput'])} req/s, "
                f"median e2el {_fmt(stats['e2el_ms'].get('median'))} ms"
            )
    if summary.get("errors"):
        lines.append(" Errors ".center(width, "-"))
        lines += [f"{count:>6}  {kind}" for kind, count in summary["errors"].items()]
    lines.append("=" * width)
    return "\n".join(lines)


def _stats_block(title: str, stats: dict[str, Any], unit: str, width: int) -> list[str]:
    """A distribution's block: mean, median, percentiles, max (and total when it has one)."""
    if not stats.get("count"):
        return []
    lines = [f" {title} ".center(width, "-")]
    for name, value in stats.items():
        if name not in ("count", "std", "p50"):  # p50 is the median, shown once
            label = name.upper() if name.startswith("p") else name.capitalize()
            lines.append(_row(f"{label}{unit if name != 'total' else ''}", value, width))
    return lines


def _video_lines(summary: dict[str, Any], width: int) -> list[str]:
    """Videos per dataset request and video tokens per request: n/a when the dataset has videos
    but the server reports no video tokens (only vlserve does); nothing for video-free runs."""
    media = (summary.get("run") or {}).get("dataset_media") or {}
    videos = media.get("videos") or {}
    lines = []
    if videos.get("total"):
        lines.append(_row("Videos per request (dataset mean)", float(videos["mean"]), width))
    tokens = summary.get("video_tokens")
    if tokens:
        lines += _stats_block("Video tokens per request", tokens, "", width)
    elif videos.get("total"):
        lines.append(_row("Video tokens per request", None, width))
        lines.append("Note: the server reported no usage.prompt_tokens_details.video_tokens")
    return lines


def _turn_lines(turns: list[dict[str, Any]], width: int) -> list[str]:
    """A small table: TTFT percentiles (the first three reported), median E2E latency and mean
    prompt tokens per turn index."""
    keys = next(
        ([k for k in row["e2el_ms"] if k.startswith("p")] for row in turns if row["successful"]),
        [],
    )[:3]
    labels = [f"TTFT {k}" if i == 0 else k for i, k in enumerate(keys)]
    lines = [
        " TTFT by turn (ms) ".center(width, "-"),
        f"{'Turn':>4}{'ok':>5}{'failed':>7}"
        + "".join(f"{label:>9}" for label in labels)
        + f"{'E2E p50':>9}{'Prompt':>8}",
    ]
    for row in turns:
        ttft = row["ttft_ms"]
        cells = [_fmt(ttft.get(k), 1) for k in keys]
        lines.append(
            f"{row['turn']:>4}{row['successful']:>5}{row['failed']:>7}"
            + "".join(f"{cell:>9}" for cell in cells)
            + f"{_fmt(row['e2el_ms'].get('median'), 1):>9}"
            + f"{_fmt(row['prompt_tokens_mean'], 0):>8}"
        )
    return lines


def _row(label: str, value: Any, width: int) -> str:
    text = _fmt(value)
    return f"{label:<{width - len(text) - 1}} {text}"


SWEEP_COLUMNS = (  # (header, sweep-line key, width, digits)
    ("Offered", "request_rate", 8, 2),
    ("Achieved", "request_throughput", 9, 2),
    ("Out tok/s", "output_throughput", 10, 1),
    ("TTFT p50", "median_ttft_ms", 10, 1),
    ("p99", "p99_ttft_ms", 8, 1),
    ("TPOT p50", "median_tpot_ms", 10, 1),
    ("p99", "p99_tpot_ms", 8, 1),
    ("E2E p50", "median_e2el_ms", 10, 1),
    ("p99", "p99_e2el_ms", 8, 1),
    ("SLO %", "slo_attainment", 7, 1),
)


def format_sweep_table(summary: dict[str, Any]) -> str:
    """One row per offered rate (sorted), latencies in ms; then the achieved rate of the highest
    passing one (the headline), the peak, and which rates ran too briefly to trust."""
    width = sum(c[2] for c in SWEEP_COLUMNS) + 8
    lines = [
        "",
        " vlserve bench sweep ".center(width, "="),
        "".join(f"{title:>{w}}" for title, _, w, _ in SWEEP_COLUMNS) + f"{'Pass':>6}",
    ]
    for row in summary["points"]:
        cells = []
        for _, key, w, digits in SWEEP_COLUMNS:
            value = row.get(key)
            if key == "slo_attainment" and value is not None:
                value = 100.0 * value
            cells.append(f"{_fmt(float(value) if value is not None else None, digits):>{w}}")
        brief = " *" if row.get("too_brief") else ""
        lines.append("".join(cells) + f"{'yes' if row['passed'] else 'no':>6}" + brief)
    lines.append("-" * width)
    lines.append("Offered, Achieved (successful): requests/s; latencies in ms")
    slo = summary.get("goodput_slo_ms") or {}
    share = 100.0 * (summary.get("sweep") or {}).get("slo_attainment", 0.9)
    criteria = (
        f"{' '.join(f'{k}<={v:g}ms' for k, v in slo.items())} for >={share:g}% of requests"
        if slo
        else "no SLO"
    )
    best = summary.get("best")
    if best:
        goodput = best.get("request_goodput")
        lines.append(
            f"Sustained ({criteria}): {_fmt(best['request_throughput'])} req/s achieved, "
            f"at the highest passing offered rate, {best['request_rate']:g} req/s"
            + (f"; goodput {_fmt(goodput)} req/s" if goodput is not None else "")
            + (" (* too brief to trust)" if best.get("too_brief") else "")
        )
    else:
        lines.append(f"No rate passed ({criteria})")
    if summary.get("max_request_throughput") is not None:
        lines.append(
            f"Peak achieved: {_fmt(summary['max_request_throughput'])} req/s "
            f"(offered {summary['max_request_throughput_rate']:g} req/s)"
        )
    brief = [row for row in summary["points"] if row.get("too_brief")]
    if brief:
        lines.append(
            f"* ran too briefly to trust ({len(brief)} of {len(summary['points'])} rates; want "
            f">= {summary.get('min_completed')} completed requests over >= "
            f"{summary.get('min_latencies')} mean E2E latencies): raise --num-requests or "
            "--duration"
        )
    lines.append("=" * width)
    return "\n".join(lines)
