"""What the nginx that `vlserve launch` puts in front costs: bench through it vs straight at instances.

Two stub servers (``vlserve.bench.stub``: 50 ms to first token, 16 tokens 5 ms apart) stand in for
two instances; nginx runs with the exact config `vlserve launch` writes. ``vlserve bench`` then runs
the same load twice, once at both instances with ``--endpoints`` and once at nginx with ``--url``,
alternating, and the script prints nginx / direct ratios of throughput and latencies. A ratio
near 1.0 means the load balancer costs nothing measurable next to generation time.

Run: ``python benchmarks/launch_nginx_overhead.py [--requests 400] [--concurrency 32] [--repeat 2]``
(needs nginx: ``apt-get install nginx``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlserve.bench.stub import StubProcess
from vlserve.launch.nginx import NginxConfig, find_nginx, nginx_command, write_nginx_files
from vlserve.launch.supervisor import probe_health


def run_bench(target: list[str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "vlserve", "bench", *target, "--dataset", "random",
           "--num-requests", str(args.requests), "--max-concurrency", str(args.concurrency),
           "--max-tokens", "16", "--model", "stub-model", "--no-plots", "--no-progress",
           "--output", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    return {
        "req/s": summary["request_throughput"],
        "ttft p50 ms": summary["ttft_ms"]["p50"],
        "e2el p50 ms": summary["e2el_ms"]["p50"],
        "e2el p99 ms": summary["e2el_ms"]["p99"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    binary = find_nginx()
    if binary is None:
        print("nginx not found (apt-get install nginx)", file=sys.stderr)
        return 1
    with (
        tempfile.TemporaryDirectory() as tmp,
        StubProcess(ttft_ms=50, itl_ms=5) as one,
        StubProcess(ttft_ms=50, itl_ms=5) as two,
    ):
        prefix = Path(tmp) / "nginx"
        front_port = _free_port()
        upstreams = (f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}")
        write_nginx_files(NginxConfig("127.0.0.1", front_port, upstreams), prefix)
        nginx = subprocess.Popen(nginx_command(binary, prefix))
        try:
            front = f"http://127.0.0.1:{front_port}"
            while not asyncio.run(probe_health(f"{front}/v1/models")):
                time.sleep(0.1)
            results: dict[str, list[dict[str, float]]] = {"direct": [], "nginx": []}
            for i in range(args.repeat):
                direct = ["--endpoints", f"{one.url}/v1,{two.url}/v1"]
                results["direct"].append(run_bench(direct, args, Path(tmp) / f"d{i}.jsonl"))
                results["nginx"].append(
                    run_bench(["--url", front], args, Path(tmp) / f"n{i}.jsonl")
                )
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
    _report(results, args)
    return 0


def _report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"{args.requests} requests x {args.repeat}, concurrency {args.concurrency}, medians of runs"
    )
    print(f"{'metric':<14}{'direct':>10}{'nginx':>10}{'ratio':>8}")
    for metric in results["direct"][0]:
        direct = statistics.median(r[metric] for r in results["direct"])
        via = statistics.median(r[metric] for r in results["nginx"])
        print(f"{metric:<14}{direct:>10.1f}{via:>10.1f}{via / direct:>8.3f}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
