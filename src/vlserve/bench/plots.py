"""Optional PNG plots (latency CDFs; throughput and concurrency over time) when matplotlib exists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from vlserve.bench.client import RequestResult

log = logging.getLogger("vlserve.bench")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(results: Sequence[RequestResult], prefix: Path) -> list[Path]:
    """Write ``<prefix>.latency_cdf.png`` and ``<prefix>.timeline.png``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install 'vlserve[plot]')")
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
