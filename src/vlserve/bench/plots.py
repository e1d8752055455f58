"""Optional PNG plots (latency CDFs; throughput and concurrency over time) when matplotlib exists."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlserve.bench.client import RequestResult

log = logging.getLogger("vlserve.bench")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install 'vlserve[plot]')")
        return None
    return plt


def write_plots(results: Sequence[RequestResult], prefix: Path) -> list[Path]:
    """Write ``<prefix>.latency_cdf.png`` and ``<prefix>.timeline.png``; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    ok = [r for r in results if r.success]
    if not ok:
        return []
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sent = [r for r in results if not r.skipped]  # turns never sent have no timeline
    paths = [_latency_cdf(plt, ok, prefix), _timeline(plt, sent, prefix)]
    return paths


def _latency_cdf(plt: object, ok: Sequence[RequestResult], prefix: Path) -> Path:
    series = {
        "TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
        "TPOT": [t for r in ok if (t := r.tpot_s) is not None],
        "ITL": [x for r in ok for x in r.itl_s],
        "E2E latency": [r.latency_s for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))  # type: ignore[attr-defined]
    for ax, (name, values) in zip(axes.flat, series.items(), strict=False):
        values = sorted(v * 1000.0 for v in values)
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of tokens")
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = prefix.with_name(prefix.name + ".latency_cdf.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def _bin_width_s(span_s: float) -> float:
    """A round bin width giving at least ~20 bins, so short runs are not one bar."""
    for width in (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0):
        if span_s / width <= 200 and span_s / width >= 20:
            return width
    return 60.0 if span_s > 30 else 0.05


def _timeline(plt: object, results: Sequence[RequestResult], prefix: Path) -> Path:
    end_s = max(r.sent_at_s + r.latency_s for r in results)
    width = _bin_width_s(end_s)
    bins = max(1, int(end_s / width) + 1)
    done = [0.0] * bins
    tokens = [0.0] * bins
    for r in results:
        if r.success:
            b = min(bins - 1, int((r.sent_at_s + r.latency_s) / width))
            done[b] += 1 / width
            tokens[b] += (r.completion_tokens or 0) / width
    events = sorted(
        [(r.sent_at_s, 1) for r in results] + [(r.sent_at_s + r.latency_s, -1) for r in results]
    )
    times, level, levels = [0.0], 0, [0]
    for t, step in events:
        level += step
        times.append(t)
        levels.append(level)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)  # type: ignore[attr-defined]
    starts = [b * width for b in range(bins)]
    top.bar(starts, done, width=width, align="edge", label="requests/s")
    if any(tokens):
        twin = top.twinx()
        middles = [t + width / 2 for t in starts]
        twin.plot(middles, tokens, color="tab:orange", label="output tokens/s")
        twin.set_ylabel("output tokens/s")
    top.set_ylabel("completed requests/s")
    top.set_title(f"Throughput over time ({width:g} s bins; line: output tokens/s)")
    bottom.step(times, levels, where="post")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("seconds since start")
    bottom.set_title("Concurrency over time (final attempts)")
    fig.tight_layout()
    path = prefix.with_name(prefix.name + ".timeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def write_sweep_plot(points: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Latency (p50, p99) against achieved throughput for TTFT, TPOT and E2E, and achieved
    throughput and goodput against the offered rate; None without matplotlib."""
    plt = _pyplot()
    rows = sorted(points, key=lambda p: p["request_rate"])
    if plt is None or not rows:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    achieved = [p["request_throughput"] for p in rows]
    for ax, (metric, title) in zip(
        axes.flat, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency")), strict=False
    ):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            values = [p.get(f"{stat}_{metric}_ms") for p in rows]
            xy = [(x, y) for x, y in zip(achieved, values, strict=True) if y is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), style, label="p50" if stat == "median" else stat)
        for p in rows:  # each point tagged with its offered rate
            y = p.get(f"median_{metric}_ms")
            if y is not None:
                ax.annotate(f"{p['request_rate']:g}", (p["request_throughput"], y), fontsize=7)
        ax.set(title=f"{title} vs throughput", xlabel="achieved requests/s", ylabel="ms")
        ax.legend()
        ax.grid(True, alpha=0.3)
    _rate_panel(axes.flat[3], rows)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rate_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    offered = [p["request_rate"] for p in rows]
    ax.plot(offered, [p["request_throughput"] for p in rows], "o-", label="achieved")
    goodput = [
        (p["request_rate"], p["request_goodput"])
        for p in rows
        if p.get("request_goodput") is not None
    ]
    if goodput:
        ax.plot(*zip(*goodput, strict=True), "s--", label="goodput")
    ax.plot(offered, offered, ":", color="grey", label="offered")
    for p in rows:
        if not p.get("passed", True):
            ax.plot(p["request_rate"], p["request_throughput"], "x", color="tab:red")
    ax.set(title="Throughput vs offered rate (x: failed)", xlabel="offered requests/s")
    ax.set_ylabel("requests/s")
    ax.legend()
    ax.grid(True, alpha=0.3)
