"""Video requests on the tiny model: TTFT at concurrency 1 and 8, decode cost, event-loop stall.

Closed-loop load (`vlserve bench`, streaming) of requests that each carry one different 4-second
320x240 clip (MP4/H.264, 30 fps, encoded in memory before timing: `--random-videos 1`) and ~16
words, max_tokens 64 with ignore_eos, at concurrency 1 and 8. Concurrency 8 runs first with all
users starting at once, which gives the request cycle, then again with the users spread over one
cycle (`--ramp-up`, as benchmarks/throughput.py does): the steady state the TTFT target is about.
Every run has its own seed, so no clip is sent twice (no cache hit). Prints:
  - per run: output tokens/s, TTFT p50/p99, E2E p50, video tokens per request (vlserve's usage);
  - the decode time per clip: `vlserve.media.video.decode_video` in-process (2 fps, 8 frames);
  - event-loop stalls: the ticker of benchmarks/media_decode.py while 8 clips decode on the
    loop (what a naive handler would do) vs through the server's MediaLoader (worker threads),
    and the slowest /health answer of the server while the spread c=8 run was going on;
  - the ratio TTFT p50 c=8 (spread) / c=1 against the target <= 2.0.
Timings on a shared 2-core machine are noisy: compare ratios within one run.

    .venv/bin/python benchmarks/video.py [--requests N] [--server-args '...']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from media_decode import max_stall_s
from throughput import INPUT_LEN, MAX_TOKENS, _verdict

SIZE, SECONDS, FPS = (320, 240), 4.0, 30.0
TARGET = 2.0


def bench(base_url: str, model: str, c: int, out: Path, n: int, seed: int, *load: str) -> dict:
    """Run `vlserve bench` (closed loop, one random clip per request) and return its summary,
    failed requests included (a server without video support answers 400s)."""
    name = out / f"c{c}-seed{seed}"
    cmd = [
        sys.executable, "-m", "vlserve", "bench", "--url", base_url, "--model", model,
        "--dataset", "random", "--num-requests", str(n), "--seed", str(seed),
        "--random-videos", "1", "--random-video-size", f"{SIZE[0]}x{SIZE[1]}",
        "--random-video-seconds", str(SECONDS), "--random-video-fps", str(FPS),
        "--random-input-len", str(INPUT_LEN), "--max-concurrency", str(c),
        "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--temperature", "0",
        "--max-retries", "0", "--output", f"{name}.jsonl", "--summary", f"{name}.summary.json",
        "--no-plots", "--no-progress", "--log-level", "WARNING", *load,
    ]  # fmt: skip
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return json.loads(Path(f"{name}.summary.json").read_text())


def clips(n: int, first: int = 1 << 23) -> list[bytes]:
    from vlserve.bench.video import synthetic_clip

    return [synthetic_clip(first + i, SIZE, SECONDS, FPS) for i in range(n)]


def decode_ms_per_clip(data: list[bytes]) -> tuple[float, int]:
    """Median wall time of ``decode_video`` per clip (2 fps), and the frames it samples."""
    from vlserve.media.video import VideoLimits, decode_video

    times, frames = [], 0
    for clip in data:
        start = time.perf_counter()
        video = decode_video(clip, VideoLimits(), fps=2.0)
        times.append(time.perf_counter() - start)
        frames = len(video.frames)
    return statistics.median(times) * 1000, frames


async def loop_stalls(data: list[bytes]) -> tuple[float, float, str]:
    """(stall decoding on the loop, stall through the server's loader, what the latter was)."""
    import base64

    from vlserve.media import MediaConfig, MediaLoader
    from vlserve.media.video import VideoLimits, decode_video

    urls = ["data:video/mp4;base64," + base64.b64encode(c).decode() for c in data]

    async def on_loop() -> None:
        for clip in data:
            decode_video(clip, VideoLimits(), fps=2.0)
            await asyncio.sleep(0)

    loader = MediaLoader(MediaConfig())
    try:
        kind = loader.video_kind(VideoLimits(), fps=2.0)  # the server's path (issue 12)
        how = "MediaLoader"

        async def through_server_path() -> None:
            await asyncio.gather(*(loader.load(url, kind) for url in urls))

    except AttributeError:  # a loader without videos: worker threads, as it would use
        how = "worker threads (MediaLoader has no video path yet)"

        async def through_server_path() -> None:
            await asyncio.gather(
                *(asyncio.to_thread(decode_video, c, VideoLimits(), 2.0) for c in data)
            )

    try:
        return await max_stall_s(on_loop), await max_stall_s(through_server_path), how
    finally:
        await loader.aclose()


class HealthProbe:
    """GET /health every 20 ms in a thread; ``worst_ms``: the slowest answer (the server's
    event loop answers it: a stall there delays it)."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url + "/health"
        self.worst_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    response.read()
            except OSError:
                continue
            self.worst_ms = max(self.worst_ms, (time.perf_counter() - start) * 1000)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def serve_and_bench(model_path: Path, work: Path, requests: int | None, extra: list[str]) -> dict:
    """c=1, c=8 at once, then c=8 spread over one cycle (with the /health probe)."""
    from vlserve.testing.server import start_server, stop_server

    server = start_server(model_path, work / "server", *extra)

    def run(c: int, n: int, seed: int, *load: str) -> dict:
        return bench(server.base_url, server.model, c, work, n, seed, *load)

    try:
        run(4, 4, 1000)  # warm-up: its clips are never sent again
        results = {"c1": run(1, requests or 12, 1), "c8": run(8, requests or 16, 8)}
        cycle_s = results["c8"]["e2el_ms"].get("median", 1000.0) / 1000
        with HealthProbe(server.base_url) as probe:
            n = max(requests or 0, 6 * 8)  # six cycles: the ramp is a small part
            results["ramped"] = run(8, n, 80, "--ramp-up", f"{cycle_s:.2f}")
        results["health_worst_ms"] = probe.worst_ms
        return results
    finally:
        stop_server(server)


def _row(label: str, s: dict) -> str:
    ttft, e2el = s["ttft_ms"], s["e2el_ms"]
    video = (s.get("video_tokens") or {}).get("mean", "n/a")
    nan = float("nan")
    return (
        f"{label:<22} {s['successful']:>4} {s['failed']:>6} "
        f"{s['output_token_throughput'] or 0:>10.1f} {ttft.get('median', nan):>9.0f} "
        f"{ttft.get('p99', nan):>9.0f} {e2el.get('median', nan):>9.0f} {video:>9}"
    )


def report(results: dict, decode: tuple[float, int], stalls: tuple[float, float, str]) -> None:
    print(
        f"\nrequests: one {SIZE[0]}x{SIZE[1]} {SECONDS:g}-s {FPS:g}-fps H.264 clip (a different one "
        f"each) + ~{INPUT_LEN} words, max_tokens {MAX_TOKENS}, ignore_eos, greedy, streaming; "
        "tiny Qwen3-VL, CPU"
    )
    print(
        f"{'run':<22} {'ok':>4} {'failed':>6} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'E2E p50':>9} {'video tok':>9}   (ms)"
    )
    for key, label in (("c1", "c=1"), ("c8", "c=8, all at once"), ("ramped", "c=8, users spread")):
        print(_row(label, results[key]))
    errors = {k: v for key in ("c1", "c8", "ramped") for k, v in results[key]["errors"].items()}
    for error, count in errors.items():
        print(f"  error ({count}x): {error}")
    decode_ms, frames = decode
    on_loop, threaded, how = stalls
    print(f"\ndecode_video per clip ({frames} frames sampled at 2 fps): {decode_ms:.1f} ms")
    print(
        f"event-loop stall, 8 clips: decoded on the loop {on_loop * 1000:.1f} ms, "
        f"{how} {threaded * 1000:.1f} ms"
    )
    print(f"slowest /health answer during the spread c=8 run: {results['health_worst_ms']:.1f} ms")
    base = results["c1"]["ttft_ms"].get("median")
    print("\nratios:")
    if not base or results["c1"]["failed"] or results["ramped"]["failed"]:
        print("  TTFT p50 c=8 / c=1: not measured (requests failed)  FAIL")
        return
    ramped = results["ramped"]["ttft_ms"]["median"] / base
    print(_verdict("TTFT p50 c=8 / c=1, users spread", ramped, TARGET, higher_is_better=False))
    at_once = results["c8"]["ttft_ms"]["median"] / base
    print(f"  {'TTFT p50 c=8 / c=1, users start at once':<48} {at_once:6.2f}  (a burst of 8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="requests per run")
    parser.add_argument("--server-args", default="", help="extra `vlserve serve` flags")
    args = parser.parse_args()

    from vlserve.testing import ensure_tiny_model

    model_path = ensure_tiny_model()
    sample = clips(8)
    decode = decode_ms_per_clip(sample)
    stalls = asyncio.run(loop_stalls(sample))
    with tempfile.TemporaryDirectory(prefix="vlserve-video-") as tmp:
        results = serve_and_bench(
            model_path, Path(tmp), args.requests, shlex.split(args.server_args)
        )
    report(results, decode, stalls)
    ramped = results["ramped"]
    ok = not ramped["failed"] and ramped["ttft_ms"].get("median") is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
