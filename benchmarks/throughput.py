"""Continuous batching on the tiny model: batched vs unbatched server vs an in-process ceiling.

Closed-loop load (`vlserve bench`, streaming) of requests that each carry a different 448x448
image, max_tokens 64 with ignore_eos, at several concurrencies, against:
  - the server with batching (--max-num-seqs 32),
  - the same server without batching (--max-num-seqs 1),
  - processor + `model.generate` on left-padded batches of the same size, one after the other,
    in-process (not a ceiling: the engine overlaps what generate does in sequence),
  - the previous engine (`--baseline-rev`, a git worktree), batched, for the same-run comparison,
  - the same closed loop through `AsyncEngine.generate` in-process: served / in-process is the
    cost of the HTTP, media and serving layers.
Prints output tokens/s, requests/s, TTFT and end-to-end p50/p99, and the ratios against the
targets of issue 3. Concurrency 8 runs twice on the batched server: with all users starting at
once (they then stay in step, so every request arrives in a burst of 8) and with the users spread
over one request cycle (`vlserve bench --ramp-up`), the steady state the TTFT target is about. Timings on a shared 2-core machine are noisy: compare ratios within one run.

    .venv/bin/python benchmarks/throughput.py [--concurrency 1 8 32] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _baseline import BASELINE_REV, worktree_src

MAX_TOKENS = 64
IMAGE = "448x448"
INPUT_LEN = 16


def bench(base_url: str, model: str, concurrency: int, out: Path, *load: str) -> dict:
    """Run `vlserve bench` (closed loop, random 448x448 images) and return its summary."""
    name = out / f"c{concurrency}-{len(list(out.glob('*.summary.json')))}"
    cmd = [
        sys.executable, "-m", "vlserve", "bench", "--url", base_url, "--model", model,
        "--dataset", "random", "--random-images", "1", "--random-image-size", IMAGE,
        "--random-input-len", str(INPUT_LEN), "--max-concurrency", str(concurrency),
        "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--temperature", "0",
        "--seed", str(concurrency), "--output", f"{name}.jsonl", "--summary",
        f"{name}.summary.json", "--no-plots", "--no-progress", "--log-level", "WARNING", *load,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(Path(f"{name}.summary.json").read_text())


def serve_and_bench(
    model_path: Path,
    label: str,
    extra: list[str],
    levels: list[int],
    requests: int | None,
    workdir: Path,
    ramp_level: int | None = None,
    src: Path | None = None,
) -> dict[int | str, dict]:
    """Each level with all users starting at once; then ``ramp_level`` again with its users
    spread over one request cycle (`--ramp-up` = that level's E2E p50), under key "ramped".
    ``src``: serve that source tree's vlserve (the previous engine) instead of this one."""
    from vlserve.testing.server import start_server, stop_server

    env = {"PYTHONPATH": str(src)} if src is not None else None
    server = start_server(model_path, workdir / label, *extra, env=env)

    def run(c: int, n: int, *load: str) -> dict:
        return bench(
            server.base_url, server.model, c, workdir / label,
            "--num-requests", str(n), "--warmup", str(min(c, 4)), *load,
        )  # fmt: skip

    try:
        results: dict[int | str, dict] = {c: run(c, requests or max(16, 2 * c)) for c in levels}
        if ramp_level in results:
            # six cycles, so that the ramp (one cycle at lower concurrency) is a small part
            cycle_s = results[ramp_level]["e2el_ms"]["median"] / 1000
            n = max(requests or 0, 6 * ramp_level)
            # new images (a seed of its own): the burst run's are in the server's caches
            seed = str(1000 + ramp_level)
            results["ramped"] = run(ramp_level, n, "--ramp-up", f"{cycle_s:.2f}", "--seed", seed)
        return results
    finally:
        stop_server(server)


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def soak(
    model_path: Path, seconds: float, concurrency: int, max_num_seqs: int, workdir: Path
) -> None:
    """Closed-loop load for ``seconds``; peak RSS after the first minute must grow < 10%."""
    import threading

    from vlserve.testing.server import start_server, stop_server

    server = start_server(model_path, workdir / "soak", "--max-num-seqs", str(max_num_seqs))
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.wait(5.0):
            samples.append((time.monotonic() - start, *_rss_kib(server.proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = bench(
            server.base_url, server.model, concurrency, workdir, "--duration", str(seconds)
        )
    finally:
        done.set()
        sampler.join()
        stop_server(server)
    print(
        f"\nsoak: {seconds:.0f} s at concurrency {concurrency}: "
        f"{summary['successful']} ok, {summary['failed']} failed, "
        f"{summary['output_token_throughput']:.1f} output tok/s"
    )
    print(f"{'t (s)':>6} {'RSS MiB':>8} {'peak MiB':>9}")
    for t, rss, peak in samples[:: max(1, len(samples) // 12)]:
        print(f"{t:>6.0f} {rss / 1024:>8.1f} {peak / 1024:>9.1f}")
    after_1min = [peak for t, _, peak in samples if t >= 60]
    if after_1min:
        growth = samples[-1][2] / after_1min[0] - 1
        print(
            _verdict(
                "peak RSS growth after the first minute (%)",
                100 * growth,
                10.0,
                higher_is_better=False,
            )
        )


def ceiling(model_path: Path, levels: list[int]) -> dict[int, float]:
    """Output tokens/s of processor + generate on left-padded batches (fp32, CPU)."""
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from vlserve.bench.synthetic import random_text

    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    rng = random.Random(0)
    padding = (
        {"processor_kwargs": {"padding": True}}
        if int(transformers.__version__.split(".")[0]) >= 5
        else {"padding": True}
    )

    def run(batch: int) -> float:
        conversations = []
        for _ in range(batch):
            image = Image.frombytes("RGB", (448, 448), rng.randbytes(448 * 448 * 3))
            conversations.append(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": image},
                            {"type": "text", "text": random_text(INPUT_LEN, rng)},
                        ],
                    }
                ]
            )
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            conversations,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
            **padding,
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] - inputs["input_ids"].shape[1] == MAX_TOKENS
        return batch * MAX_TOKENS / elapsed

    run(2)  # warm up
    return {c: max(run(c) for _ in range(2)) for c in levels}


def in_process(model_path: Path, levels: list[int], requests: int | None) -> dict[int, float]:
    """Output tokens/s of the same closed loop through ``AsyncEngine.generate`` in this process:
    no HTTP, no media decoding, no JSON; images built before timing."""
    import asyncio

    import torch
    from PIL import Image

    from vlserve.bench.synthetic import random_text
    from vlserve.engine.device import DeviceInfo
    from vlserve.engine.engine import AsyncEngine, EngineConfig
    from vlserve.engine.prompt import ChatPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.scheduler import SchedulerConfig

    engine = AsyncEngine(
        EngineConfig(str(model_path), SchedulerConfig(max_num_seqs=32)),
        DeviceInfo("cpu", torch.float32),
    )
    engine.start()
    rng = random.Random(1)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    def prompt() -> ChatPrompt:
        image = Image.frombytes("RGB", (448, 448), rng.randbytes(448 * 448 * 3))
        text = random_text(INPUT_LEN, rng)
        parts = [{"type": "image", "image": image}, {"type": "text", "text": text}]
        return ChatPrompt([{"role": "user", "content": parts}])

    async def level(c: int) -> float:
        n = requests or max(16, 2 * c)
        prompts = [prompt() for _ in range(n)]
        tokens = 0

        async def user(k: int) -> None:
            nonlocal tokens
            for i in range(k, n, c):
                stream = await engine.generate(prompts[i], params, f"c{c}-{i}")
                async for event in stream:
                    tokens += len(event.token_ids)

        start = time.perf_counter()
        await asyncio.gather(*(user(k) for k in range(c)))
        return tokens / (time.perf_counter() - start)

    async def main() -> dict[int, float]:
        await engine.wait_ready()
        await level(min(levels))  # warm up
        return {c: await level(c) for c in levels}

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def _row(label: str, c: int, s: dict) -> str:
    return (
        f"{label:<10} {c:>4} {s['output_token_throughput']:>10.1f} "
        f"{s['request_throughput']:>8.2f} {s['ttft_ms']['median']:>9.0f} "
        f"{s['ttft_ms']['p99']:>9.0f} {s['e2el_ms']['median']:>9.0f} "
        f"{s['e2el_ms']['p99']:>9.0f} {s['failed']:>6}"
    )


def _verdict(name: str, value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"  {name:<48} {value:6.2f}  (target {sign} {target:g})  {'PASS' if ok else 'MISS'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default: max(16, 2 x concurrency))",
    )
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument(
        "--soak-s",
        type=float,
        default=0,
        help="then soak at the highest concurrency for this long (e.g. 300)",
    )
    parser.add_argument(
        "--baseline-rev",
        default=BASELINE_REV,
        help="also serve this revision (git worktree) batched, for the same-run comparison; '' to skip",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="extra `vlserve serve` flags for both servers (one string)",
    )
    args = parser.parse_args()

    from vlserve.testing import ensure_tiny_model

    model_path = ensure_tiny_model()
    levels = sorted(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="vlserve-throughput-") as tmp:
        work = Path(tmp)
        extra = shlex.split(args.server_args)
        seqs = ["--max-num-seqs", str(args.max_num_seqs), *extra]
        batched = serve_and_bench(
            model_path, "batched", seqs, levels, args.requests, work, ramp_level=8
        )
        unbatched = serve_and_bench(
            model_path, "unbatched", ["--max-num-seqs", "1", *extra], levels, args.requests, work
        )
        previous = (
            serve_and_bench(
                model_path,
                "previous",
                seqs,
                levels,
                args.requests,
                work,
                src=worktree_src(args.baseline_rev),
            )  # fmt: skip
            if args.baseline_rev
            else {}
        )
        _report(
            levels,
            batched,
            unbatched,
            previous,
            ceiling(model_path, levels),
            in_process(model_path, levels, args.requests),
        )
        if args.soak_s > 0:
            soak(model_path, args.soak_s, levels[-1], args.max_num_seqs, work)
    return 0


def _report(
    levels: list[int],
    batched: dict[int | str, dict],
    unbatched: dict[int | str, dict],
    previous: dict[int | str, dict],
    ceil: dict[int, float],
    engine: dict[int, float],
) -> None:
    print(
        f"\nrequests: one {IMAGE} image + ~{INPUT_LEN} words, max_tokens {MAX_TOKENS}, "
        "ignore_eos, greedy, streaming; tiny Qwen3-VL, fp32, CPU"
    )
    print(
        f"{'server':<10} {'conc':>4} {'out tok/s':>10} {'req/s':>8} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'E2E p50':>9} {'E2E p99':>9} {'failed':>6}   (ms)"
    )
    for label, table in (("batched", batched), ("unbatched", unbatched), ("previous", previous)):
        for c in levels if table else ():
            print(_row(label, c, table[c]))
    if "ramped" in batched:
        print(_row("ramped", 8, batched["ramped"]) + "   (users spread over one cycle)")
    for c in levels:
        print(
            f"{'generate':<10} {c:>4} {ceil[c]:>10.1f}   (processor + generate, one after the other)"
        )
    for c in levels:
        print(f"{'engine':<10} {c:>4} {engine[c]:>10.1f}   (AsyncEngine in-process, no HTTP/media)")
    top, low = levels[-1], levels[0]
    tok = batched[top]["output_token_throughput"]
    print("\nratios:")
    print(
        _verdict(
            f"c={top}: batched / unbatched output tok/s",
            tok / unbatched[top]["output_token_throughput"],
            4.0,
        )
    )
    print(_verdict(f"c={top}: batched / in-process generate", tok / ceil[top], 0.70))
    print(_verdict(f"c={top}: served / in-process engine", tok / engine[top], 0.90))
    if previous:
        old = previous[top]["output_token_throughput"]
        print(_verdict(f"c={top}: batched / previous engine, same run", tok / old, 1.0))
    if low == 1:
        single = batched[1]["output_token_throughput"] / ceil[1]
        print(_verdict("c=1: served / in-process generate (batch 1)", single, 1.0))
    if "ramped" in batched and low != 8:
        base = batched[low]["ttft_ms"]["median"]
        ramped = batched["ramped"]["ttft_ms"]["median"] / base
        print(
            _verdict(f"TTFT p50 c=8 / c={low}, users spread", ramped, 2.0, higher_is_better=False)
        )
        at_once = batched[8]["ttft_ms"]["median"] / base
        print(
            f"  {f'TTFT p50 c=8 / c={low}, users start at once':<48} {at_once:6.2f}  (a burst of 8 "
            "image prefills on the same cores; see docs/BENCH.md)"
        )


if __name__ == "__main__":
    sys.exit(main())
