"""Summaries of a run: throughput over successful requests, latency percentiles, goodput."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlserve.bench.client import RequestResult

NO_USAGE_NOTE = (
    "the server sent no token usage: token counts, token throughputs and TPOT are not reported "
    "(streaming servers need stream_options.include_usage support)"
)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); values must be sorted."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def distribution(values: Iterable[float], percentiles: Sequence[float]) -> dict[str, Any]:
    """count, mean, std, min, median, chosen percentiles and max."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    mean = sum(ordered) / len(ordered)
    std = math.sqrt(sum((v - mean) ** 2 for v in ordered) / len(ordered))
    stats: dict[str, Any] = {
        "count": len(ordered),
        "mean": mean,
        "std": std,
        "min": ordered[0],
        "median": percentile(ordered, 50),
    }
    for p in percentiles:
        stats[percentile_key(p)] = percentile(ordered, p)
    stats["max"] = ordered[-1]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


def distribution_ms(values_s: Iterable[float], percentiles: Sequence[float]) -> dict[str, Any]:
    """``distribution`` of seconds, in milliseconds."""
    return distribution((v * 1000.0 for v in values_s), percentiles)


def video_token_summary(
    successful: Sequence[RequestResult], percentiles: Sequence[float]
) -> dict[str, Any] | None:
    """Video tokens per request (``usage.prompt_tokens_details.video_tokens``) over the
    successful requests that reported them, with their total; None when none did (servers
    other than vlserve do not report them)."""
    values = [r.video_tokens for r in successful if r.video_tokens is not None]
    if not values:
        return None
    return {**distribution(values, percentiles), "total": sum(values)}


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def _rate(count: float, duration_s: float) -> float:
    return round(count / duration_s, 3) if duration_s > 0 else 0.0


def token_summary(successful: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Token totals and throughputs from server usage, or a note saying there was none."""
    with_usage = [r for r in successful if r.completion_tokens is not None]
    summary: dict[str, Any] = {"requests_with_usage": len(with_usage)}
    if not with_usage:
        summary.update(
            total_prompt_tokens=None,
            total_completion_tokens=None,
            output_token_throughput=None,
            total_token_throughput=None,
            usage_note=NO_USAGE_NOTE if successful else None,
        )
        return summary
    prompt = sum(r.prompt_tokens or 0 for r in with_usage)
    completion = sum(r.completion_tokens or 0 for r in with_usage)
    summary.update(
        total_prompt_tokens=prompt,
        total_completion_tokens=completion,
        # Output tokens only: the prototype's "tokens/s" silently added prompt tokens.
        output_token_throughput=_rate(completion, duration_s),
        total_token_throughput=_rate(prompt + completion, duration_s),
        usage_note=None
        if len(with_usage) == len(successful)
        else f"only {len(with_usage)} of {len(successful)} successful requests carried usage; "
        "token figures cover those only",
    )
    return summary


def meets_slo(result: RequestResult, slo_ms: Mapping[str, float]) -> bool:
    """True when every SLO given is met; a metric that could not be measured fails it."""
    values = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2el": result.latency_s}
    for name, limit_ms in slo_ms.items():
        value = values[name]
        if value is None or value * 1000.0 > limit_ms:
            return False
    return True


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    percentiles: Sequence[float] = (50.0, 90.0, 99.0),
    goodput_slo_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The numbers of a run. Request and token rates count successful requests only."""
    successful = [r for r in results if r.success]
    failed = len(results) - len(successful)
    summary: dict[str, Any] = {
        "total_requests": len(results),
        "successful": len(successful),
        "failed": failed,
        "success_rate": round(100.0 * len(successful) / len(results), 2) if results else 0.0,
        "duration_s": round(duration_s, 3),
        "request_throughput": _rate(len(successful), duration_s),
        "retries": sum(r.retry_count for r in results),
        "requests_retried": sum(r.retry_count > 0 for r in results),
    }
    summary.update(token_summary(successful, duration_s))
    summary["video_tokens"] = video_token_summary(successful, percentiles)
    summary["ttft_ms"] = distribution_ms(
        (r.ttft_s for r in successful if r.ttft_s is not None), percentiles
    )
    summary["tpot_ms"] = distribution_ms(
        (t for r in successful if (t := r.tpot_s) is not None), percentiles
    )
    summary["itl_ms"] = distribution_ms((x for r in successful for x in r.itl_s), percentiles)
    summary["e2el_ms"] = distribution_ms((r.latency_s for r in successful), percentiles)
    summary["queued_ms"] = distribution_ms(
        (r.queued_s for r in results if not r.skipped), percentiles
    )
    if goodput_slo_ms:
        good = sum(meets_slo(r, goodput_slo_ms) for r in successful)
        summary["goodput"] = {
            "slo_ms": dict(goodput_slo_ms),
            "requests": good,
            "request_throughput": _rate(good, duration_s),
        }
    summary["errors"] = dict(
        Counter(_error_kind(r.error) for r in results if not r.success).most_common(10)
    )
    if any(r.conversation_id is not None for r in results):
        summary["conversations"] = conversation_summary(results)
        summary["turns"] = turn_breakdown(results, percentiles)
    return summary


def conversation_summary(results: Sequence[RequestResult]) -> dict[str, int]:
    """Conversations whose recorded turns all succeeded, those with a failed turn, and the turns
    never sent after a failure (recorded as failed results, so counted in ``failed`` too)."""
    all_ok: dict[str, bool] = {}
    for r in results:
        if r.conversation_id is not None:
            all_ok[r.conversation_id] = all_ok.get(r.conversation_id, True) and r.success
    completed = sum(all_ok.values())
    return {
        "total": len(all_ok),
        "completed": completed,
        "failed": len(all_ok) - completed,
        "turns_skipped": sum(r.skipped for r in results),
    }


def turn_breakdown(
    results: Sequence[RequestResult], percentiles: Sequence[float]
) -> list[dict[str, Any]]:
    """Per turn index: later turns send longer histories, which a prefix cache should absorb."""
    by_turn: dict[int, list[RequestResult]] = {}
    for r in results:
        if r.turn is not None:
            by_turn.setdefault(r.turn, []).append(r)
    rows = []
    for turn, group in sorted(by_turn.items()):
        ok = [r for r in group if r.success]
        prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        rows.append(
            {
                "turn": turn,
                "requests": len(group),
                "successful": len(ok),
                "failed": len(group) - len(ok),
                "skipped": sum(r.skipped for r in group),
                "ttft_ms": distribution_ms(
                    (r.ttft_s for r in ok if r.ttft_s is not None), percentiles
                ),
                "e2el_ms": distribution_ms((r.latency_s for r in ok), percentiles),
                "prompt_tokens_mean": round(sum(prompt) / len(prompt), 1) if prompt else None,
            }
        )
    return rows


def endpoint_breakdown(
    results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Per endpoint (where each request's last attempt went): counts, rates and latencies."""
    by_endpoint: dict[str, list[RequestResult]] = {}
    for result in results:
        if not result.skipped:  # never sent anywhere
            by_endpoint.setdefault(result.endpoint, []).append(result)
    breakdown = {}
    for endpoint, group in sorted(by_endpoint.items()):
        successful = [r for r in group if r.success]
        tokens = token_summary(successful, duration_s)
        breakdown[endpoint] = {
            "requests": len(group),
            "successful": len(successful),
            "failed": len(group) - len(successful),
            "request_throughput": _rate(len(successful), duration_s),
            "output_token_throughput": tokens["output_token_throughput"],
            "ttft_ms": distribution_ms(
                (r.ttft_s for r in successful if r.ttft_s is not None), percentiles
            ),
            "e2el_ms": distribution_ms((r.latency_s for r in successful), percentiles),
        }
    return breakdown


def _error_kind(error: str | None) -> str:
    return (error or "unknown error")[:120]
