"""How much the bench client itself costs: req/s vs ideal and CPU per request/chunk vs targets.

A minimal stub server in its own process (raw asyncio, so that it is not the bottleneck) answers
every request after a fixed 50 ms; streaming answers then send ``--tokens`` chunks, each its own
write. At ``--max-concurrency 64`` the ideal is 64 / 0.05 s = 1,280 req/s. Targets: at least 85% of
ideal, at most 0.5 ms of client CPU per request and 30 µs per streamed chunk. For scale it also
times a bare aiohttp loop (no SSE parsing, no bookkeeping, no results file) on the same stub.

Run: ``python benchmarks/client_overhead.py [--requests 3000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from vlserve.bench.config import BenchConfig, DatasetConfig, LoadConfig, RequestOptions, RetryPolicy
from vlserve.bench.dataset import BenchRequest
from vlserve.bench.report import ResultsWriter
from vlserve.bench.runner import run_benchmark

TARGET_FRACTION = 0.85
TARGET_CPU_MS_PER_REQUEST = 0.5
TARGET_CPU_US_PER_CHUNK = 30.0
_LENGTH = re.compile(rb"(?i)content-length:\s*(\d+)")
_STREAM = re.compile(rb'"stream"\s*:\s*true')


class _StubProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive; answers each POST after ``delay_s`` with canned bytes."""

    def __init__(self, delay_s: float, plain: bytes, stream: list[bytes]) -> None:
        self.delay_s, self.plain, self.stream = delay_s, plain, stream
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            match = _LENGTH.search(self.buf, 0, end)
            size = int(match.group(1)) if match else 0
            if len(self.buf) < end + 4 + size:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + size], self.buf[end + 4 + size :]
            stream = _STREAM.search(body) is not None
            asyncio.get_running_loop().call_later(self.delay_s, self.answer, stream)

    def answer(self, stream: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for part in self.stream if stream else [self.plain]:
            self.transport.write(part)


def canned(tokens: int) -> tuple[bytes, list[bytes]]:
    usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}
    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
    message = {"role": "assistant", "content": "".join(f"t{i} " for i in range(tokens))}
    body = json.dumps({**base, "object": "chat.completion", "usage": usage,
                       "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}).encode()  # fmt: skip
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]} for i in range(tokens)]  # fmt: skip
    events += [{**base, "choices": [], "usage": usage}]
    frames = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    frames.append(b"data: [DONE]\n\n")
    chunks = [b"%x\r\n%s\r\n" % (len(f), f) for f in frames] + [b"0\r\n\r\n"]
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return plain, [head + chunks[0], *chunks[1:]]


async def serve(port: int, delay_s: float, tokens: int) -> None:
    plain, stream = canned(tokens)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _StubProtocol(delay_s, plain, stream), "127.0.0.1", port, backlog=1024
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


@dataclass
class Measure:
    requests_per_s: float
    cpu_ms_per_request: float
    chunks_per_request: float
    failed: int
    server_cpu_ms_per_request: float


def process_cpu_s(pid: int) -> float:
    """utime + stime of another process (Linux), to see whether the stub was the limit."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_vlserve(
    url: str, stream: bool, args: argparse.Namespace, out: Path
) -> tuple[int, float, float, int]:
    config = BenchConfig(
        dataset=DatasetConfig(kind="random"),
        request=RequestOptions(model="stub", max_tokens=args.tokens, stream=stream, timeout_s=30),
        retry=RetryPolicy(max_retries=0),
        load=LoadConfig(
            endpoints=(url,), max_concurrency=args.concurrency, num_requests=args.requests
        ),
    )
    requests = [BenchRequest(f"q{i}", [{"role": "user", "content": f"Describe image {i}."}], "b") for i in range(256)]  # fmt: skip
    with ResultsWriter(out) as writer:  # as the CLI does: one flushed JSON line per result
        outcome = asyncio.run(run_benchmark(config, requests, writer.write))
    chunks = sum(len(r.chunk_times_s) for r in outcome.results)
    return (
        len(outcome.results),
        outcome.duration_s,
        chunks,
        sum(not r.success for r in outcome.results),
    )


async def _bare_aiohttp(url: str, stream: bool, args: argparse.Namespace) -> float:
    body = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": args.tokens, "stream": stream}).encode()  # fmt: skip
    semaphore = asyncio.Semaphore(args.concurrency)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with (
                semaphore,
                session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
            ):
                async for _ in resp.content.iter_any():
                    pass

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(args.requests)))
        return time.perf_counter() - start


def measure(
    kind: str, stream: bool, url: str, pid: int, args: argparse.Namespace, out: Path
) -> Measure:
    cpu0, server0 = time.process_time(), process_cpu_s(pid)
    if kind == "vlserve":
        n, duration, chunks, failed = measure_vlserve(url, stream, args, out)
    else:
        n, duration, chunks, failed = (
            args.requests,
            asyncio.run(_bare_aiohttp(url, stream, args)),
            0,
            0,
        )
    cpu, server = time.process_time() - cpu0, process_cpu_s(pid) - server0
    return Measure(n / duration, cpu / n * 1e3, chunks / n, failed, server / n * 1e3)


def report(runs: dict[tuple[str, bool], list[Measure]], ideal: float) -> None:
    med = {
        key: sorted(ms, key=lambda m: m.cpu_ms_per_request)[len(ms) // 2]
        for key, ms in runs.items()
    }
    for (kind, stream), m in med.items():
        name = f"{kind:<13} {'streaming' if stream else 'non-streaming':<13}"
        line = f"{name} {m.requests_per_s:6,.0f} req/s = {m.requests_per_s / ideal:4.0%} of ideal; client CPU {m.cpu_ms_per_request:.3f} ms/request"
        if kind == "vlserve":
            line += (f" | ratios vs targets: throughput {m.requests_per_s / ideal / TARGET_FRACTION:.2f} (>= 1 passes), "
                     f"CPU {m.cpu_ms_per_request / TARGET_CPU_MS_PER_REQUEST:.2f} (<= 1 passes); failed {m.failed}")  # fmt: skip
        print(line + f"; stub CPU {m.server_cpu_ms_per_request:.3f} ms/request")
    s, ns = med[("vlserve", True)], med[("vlserve", False)]
    all_in = s.cpu_ms_per_request * 1e3 / s.chunks_per_request
    extra = (s.cpu_ms_per_request - ns.cpu_ms_per_request) * 1e3 / s.chunks_per_request
    print(f"per streamed chunk ({s.chunks_per_request:.0f}/request): {extra:.1f} µs over non-streaming "
          f"(ratio to {TARGET_CPU_US_PER_CHUNK:g} µs target: {extra / TARGET_CPU_US_PER_CHUNK:.2f}); "
          f"{all_in:.1f} µs if all request CPU is charged to chunks (ratio {all_in / TARGET_CPU_US_PER_CHUNK:.2f})")  # fmt: skip
    for stream in (False, True):
        bare, ours = med[("bare-aiohttp", stream)], med[("vlserve", stream)]
        print(f"vlserve bench CPU / bare aiohttp CPU ({'streaming' if stream else 'non-streaming'}): "
              f"{ours.cpu_ms_per_request / bare.cpu_ms_per_request:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--tokens", type=int, default=16, help="streamed chunks per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the median is shown")
    parser.add_argument("--serve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.delay_ms / 1e3, args.tokens))
        return 0
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        "0",
        "--delay-ms",
        str(args.delay_ms),
        "--tokens",
        str(args.tokens),
    ]
    stub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert stub.stdout is not None
        url = f"http://127.0.0.1:{int(stub.stdout.readline().split()[-1])}/v1/chat/completions"
        ideal = args.concurrency / (args.delay_ms / 1e3)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.jsonl"
            warm = argparse.Namespace(**{**vars(args), "requests": 300})
            measure("vlserve", True, url, stub.pid, warm, out)
            runs: dict[tuple[str, bool], list[Measure]] = {}
            for _ in range(args.repeat):  # interleaved, so that load from others hits every mode
                for kind in ("vlserve", "bare-aiohttp"):
                    for stream in (False, True):
                        runs.setdefault((kind, stream), []).append(
                            measure(kind, stream, url, stub.pid, args, out)
                        )
    finally:
        stub.terminate()
        stub.wait()
    print(f"ideal {ideal:,.0f} req/s (concurrency {args.concurrency}, {args.delay_ms:g} ms per request), "
          f"{args.requests} requests x {args.repeat} runs per mode, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    report(runs, ideal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
