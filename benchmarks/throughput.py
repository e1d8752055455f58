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
over one request cycle (`vlserve bench --ramp-up`), the steady state the TTFT target is about.

Timings on a shared 2-core machine are noisy, and noise only ever slows a run down. So the batched
server, the previous engine, the in-process engine and generate run in interleaved rounds
(`--rounds`, default 3), each round on new images, and each is reported by its best round, the
same rule for all; every round's figure is printed too. The unbatched server runs one round.

    .venv/bin/python benchmarks/throughput.py [--concurrency 1 8 32] [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _baseline import BASELINE_REV, worktree_src

MAX_TOKENS = 64
IMAGE = "448x448"
INPUT_LEN = 16


def bench(
    base_url: str, model: str, concurrency: int, out: Path, *load: str, seed: int | None = None
) -> dict:
    """Run `vlserve bench` (closed loop, random 448x448 images; ``seed`` picks them, default the
    concurrency) and return its summary."""
    name = out / f"c{concurrency}-{len(list(out.glob('*.summary.json')))}"
    cmd = [
        sys.executable, "-m", "vlserve", "bench", "--url", base_url, "--model", model,
        "--dataset", "random", "--random-images", "1", "--random-image-size", IMAGE,
        "--random-input-len", str(INPUT_LEN), "--max-concurrency", str(concurrency),
        "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--temperature", "0",
        "--seed", str(concurrency if seed is None else seed), "--output", f"{name}.jsonl", "--summary",
        f"{name}.summary.json", "--no-plots", "--no-progress", "--log-level", "WARNING", *load,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(Path(f"{name}.summary.json").read_text())


class Served:
    """A `vlserve serve` process (``src``: that source tree's vlserve, the previous engine) and
    closed-loop runs against it."""

    def __init__(
        self, model_path: Path, label: str, extra: list[str], workdir: Path, src: Path | None = None
    ) -> None:
        from vlserve.testing.server import start_server

        self.workdir = workdir / label
        env = {"PYTHONPATH": str(src)} if src is not None else None
        self.server = start_server(model_path, self.workdir, *extra, env=env)

    def run(self, c: int, n: int, seed: int, *load: str) -> dict:
        return bench(
            self.server.base_url, self.server.model, c, self.workdir,
            "--num-requests", str(n), "--warmup", str(min(c, 4)), *load, seed=seed,
        )  # fmt: skip

    def ramped(self, c: int, burst: dict, requests: int | None) -> dict:
        """Level ``c`` again with its users spread over one request cycle (`--ramp-up` = the
        burst run's E2E p50), for six cycles so that the ramp is a small part; new images (a seed
        of its own), as the burst run's are in the server's caches."""
        cycle_s = burst["e2el_ms"]["median"] / 1000
        n = max(requests or 0, 6 * c)
        return self.run(c, n, 1000 + c, "--ramp-up", f"{cycle_s:.2f}")

    def close(self) -> None:
        from vlserve.testing.server import stop_server

        stop_server(self.server)


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


class Generate:
    """Processor + ``model.generate`` on left-padded batches (fp32, CPU), one after the other."""

    def __init__(self, model_path: Path) -> None:
        import torch
        import transformers
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            model_path, dtype=torch.float32
        ).eval()
        self.rng = random.Random(0)
        major = int(transformers.__version__.split(".")[0])
        self.padding = {"processor_kwargs": {"padding": True}} if major >= 5 else {"padding": True}
        self.run(2)  # warm up

    def run(self, batch: int) -> float:
        """Output tokens/s of one batch of ``batch`` new requests."""
        import torch

        conversations = [[{"role": "user", "content": _parts(self.rng)}] for _ in range(batch)]
        start = time.perf_counter()
        inputs = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
            **self.padding,
        )
        with torch.inference_mode():
            out = self.model.generate(
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


def _parts(rng: random.Random) -> list[dict]:
    """One request's content: a random 448x448 image (built untimed) and ~16 random words."""
    from PIL import Image

    from vlserve.bench.synthetic import random_text

    image = Image.frombytes("RGB", (448, 448), rng.randbytes(448 * 448 * 3))
    return [
        {"type": "image", "image": image},
        {"type": "text", "text": random_text(INPUT_LEN, rng)},
    ]


class InProcess:
    """The same closed loop through ``AsyncEngine.generate`` in this process: no HTTP, no media
    decoding, no JSON; images built before timing."""

    def __init__(self, model_path: Path) -> None:
        import asyncio

        import torch

        from vlserve.engine.device import DeviceInfo
        from vlserve.engine.engine import AsyncEngine, EngineConfig
        from vlserve.engine.request import SamplingParams
        from vlserve.engine.scheduler import SchedulerConfig

        self.engine = AsyncEngine(
            EngineConfig(str(model_path), SchedulerConfig(max_num_seqs=32)),
            DeviceInfo("cpu", torch.float32),
        )
        self.engine.start()
        self.rng = random.Random(1)
        self.params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        self.runs = 0
        asyncio.run(self.engine.wait_ready())
        self.run(1, 4)  # warm up

    def run(self, c: int, n: int) -> float:
        """Output tokens/s of ``n`` new requests from ``c`` users in a closed loop."""
        import asyncio

        from vlserve.engine.prompt import ChatPrompt

        prompts = [ChatPrompt([{"role": "user", "content": _parts(self.rng)}]) for _ in range(n)]
        self.runs += 1
        tokens = 0

        async def user(k: int) -> None:
            nonlocal tokens
            for i in range(k, n, c):
                request_id = f"r{self.runs}-{i}"
                async for event in await self.engine.generate(prompts[i], self.params, request_id):
                    tokens += len(event.token_ids)

        async def level() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(user(k) for k in range(c)))
            return tokens / (time.perf_counter() - start)

        return asyncio.run(level())

    def close(self) -> None:
        self.engine.shutdown()


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
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of the batched server, previous engine, in-process engine and "
        "generate; each is reported by its best round (default 3)",
    )
    args = parser.parse_args()

    from vlserve.engine import openmp

    # what `vlserve serve` applies, here for the in-process rows and every server started below
    openmp.apply_defaults()
    from vlserve.testing import ensure_tiny_model

    model_path = ensure_tiny_model()
    levels = sorted(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="vlserve-throughput-") as tmp:
        work = Path(tmp)
        extra = shlex.split(args.server_args)
        seqs = ["--max-num-seqs", str(args.max_num_seqs), *extra]
        runs, ramped = interleaved(model_path, work, seqs, levels, args)
        unbatched = Served(model_path, "unbatched", ["--max-num-seqs", "1", *extra], work)
        try:
            single = {c: unbatched.run(c, _requests(args, c), c) for c in levels}
        finally:
            unbatched.close()
        _report(levels, runs, ramped, single)
        if args.soak_s > 0:
            soak(model_path, args.soak_s, levels[-1], args.max_num_seqs, work)
    return 0


def _requests(args: argparse.Namespace, c: int) -> int:
    return args.requests or max(16, 2 * c)


Result = dict | float  # a served run's `vlserve bench` summary, or an in-process run's tok/s


def _tok(result: Result) -> float:
    return result if isinstance(result, float) else result["output_token_throughput"]


def interleaved(
    model_path: Path, work: Path, seqs: list[str], levels: list[int], args: argparse.Namespace
) -> tuple[dict[str, dict[int, list[Result]]], dict | None]:
    """Every contender at every level, round after round (each round on new images); then the
    batched server's c=8 with its users spread. Returns each contender's runs by level."""
    with contextlib.ExitStack() as stack:
        batched = Served(model_path, "batched", seqs, work)
        stack.callback(batched.close)
        contenders: dict[str, Callable[[int, int], Result]] = {
            "batched": lambda c, r: batched.run(c, _requests(args, c), c + 100 * r)
        }
        if args.baseline_rev:
            src = worktree_src(args.baseline_rev)
            previous = Served(model_path, "previous", seqs, work, src=src)
            stack.callback(previous.close)
            contenders["previous"] = lambda c, r: previous.run(c, _requests(args, c), c + 100 * r)
        engine = InProcess(model_path)
        stack.callback(engine.close)
        contenders["engine"] = lambda c, r: engine.run(c, _requests(args, c))
        generate = Generate(model_path)
        contenders["generate"] = lambda c, r: generate.run(c)
        runs: dict[str, dict[int, list[Result]]] = {
            name: {c: [] for c in levels} for name in contenders
        }
        for r in range(args.rounds):
            for c in levels:
                for name, run in contenders.items():
                    runs[name][c].append(run(c, r))
        ramped = None
        if 8 in levels:
            ramped = batched.ramped(8, max(runs["batched"][8], key=_tok), args.requests)  # type: ignore[arg-type]
        return runs, ramped


def _report(
    levels: list[int],
    runs: dict[str, dict[int, list[Result]]],
    ramped: dict | None,
    unbatched: dict[int, dict],
) -> None:
    best = {name: {c: max(rs, key=_tok) for c, rs in by.items()} for name, by in runs.items()}
    batched, previous = best["batched"], best.get("previous", {})
    ceil, engine = best["generate"], best["engine"]
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
            print(_row(label, c, table[c]))  # type: ignore[arg-type]
    if ramped is not None:
        print(_row("ramped", 8, ramped) + "   (users spread over one cycle)")
    for c in levels:
        print(
            f"{'generate':<10} {c:>4} {ceil[c]:>10.1f}   (processor + generate, one after the other)"
        )
    for c in levels:
        print(f"{'engine':<10} {c:>4} {engine[c]:>10.1f}   (AsyncEngine in-process, no HTTP/media)")
    print("\nrounds, interleaved (output tok/s; each row above is its best):")
    for name, by_level in runs.items():
        for c, results in by_level.items():
            print(f"  {name:<10} {c:>4}  " + " / ".join(f"{_tok(x):.0f}" for x in results))

    top, low = levels[-1], levels[0]
    tok = _tok(batched[top])
    print("\nratios:")
    print(
        _verdict(
            f"c={top}: batched / unbatched (one round) tok/s",
            tok / _tok(unbatched[top]),
            4.0,
        )
    )
    print(_verdict(f"c={top}: batched / in-process generate", tok / ceil[top], 0.70))
    print(_verdict(f"c={top}: served / in-process engine", tok / engine[top], 0.90))
    if previous:
        old = _tok(previous[top])
        print(_verdict(f"c={top}: batched / previous engine, same run", tok / old, 1.0))
    if low == 1:
        single = _tok(batched[1]) / ceil[1]
        print(_verdict("c=1: served / in-process generate (batch 1)", single, 1.0))
    if ramped is not None and low != 8:
        base = batched[low]["ttft_ms"]["median"]
        spread = ramped["ttft_ms"]["median"] / base
        print(
            _verdict(f"TTFT p50 c=8 / c={low}, users spread", spread, 2.0, higher_is_better=False)
        )
        at_once = batched[8]["ttft_ms"]["median"] / base
        print(
            f"  {f'TTFT p50 c=8 / c={low}, users start at once':<48} {at_once:6.2f}  (a burst of 8 "
            "image prefills on the same cores; see docs/BENCH.md)"
        )


if __name__ == "__main__":
    sys.exit(main())
