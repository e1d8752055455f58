"""Structured output's cost: concurrency 32 with half the requests constrained by a JSON schema,
against the same load all unconstrained, on one tiny-model server in one run.

Closed loop (each of 32 users sends its next request when the last one ends), text prompts,
max_tokens 64, greedy. The constrained users ask for an invoice-like schema whose first field is
a free string (the random model writes it until max_tokens: a dense mask, the costly case for
the sampler), the others are free (ignore_eos). The two loads alternate (free, mixed, free,
mixed...) to spread the machine's noise; output tokens/s per load is the median over rounds.
Also prints the grammar compiler's vocabulary setup and a schema's compile time, cold and
cached, in-process and through a grammar worker process (the server's path), with the same
tokenizer (``--compile-only``: just those).

Target (issue 11): mixed / free >= 0.85.

    .venv/bin/python benchmarks/structured.py [--rounds 3] [--requests 96] [--compile-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "CNY"]},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer"}, "item": {"type": "string"}},
                "required": ["qty", "item"],
            },
        },
    },
    "required": ["summary", "paid", "currency", "lines"],
}
CONCURRENCY = 32
MAX_TOKENS = 64


async def _load(base_url: str, model: str, requests: int, constrained_share: float) -> float:
    """Output tokens/s of a closed loop of ``requests`` requests at CONCURRENCY."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600)
    counter = iter(range(requests))
    tokens = 0
    per_kind: dict[bool, list[int]] = {True: [], False: []}

    async def user(u: int) -> None:
        nonlocal tokens
        constrained = u < CONCURRENCY * constrained_share
        for i in counter:
            extra: dict = {"ignore_eos": True}
            kw: dict = {}
            if constrained:
                kw["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "invoice", "schema": SCHEMA},
                }
            out = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Invoice {i} from user {u}: extract it."}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body=extra,
                **kw,
            )
            tokens += out.usage.completion_tokens  # type: ignore[union-attr]
            per_kind[constrained].append(out.usage.completion_tokens)  # type: ignore[union-attr]

    start = time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(CONCURRENCY)))
    wall = time.perf_counter() - start
    await client.close()
    if per_kind[True]:
        mean = statistics.fmean(per_kind[True])
        print(f"  constrained requests: {mean:.1f} tokens on average (max_tokens {MAX_TOKENS})")
    return tokens / wall


WIDE = 150  # optional properties: a schema that takes a while (about 0.1 s) to compile


def compile_times(model_path: Path, schemas: int = 7) -> dict[str, float]:
    """Setup, then cold compiles in-process and the server's way (``obtain``: a trial in a
    grammar worker process, then the compile here), the median over ``schemas`` variants (each
    its own cache entry), after the worker has started: the invoice schema, and one of ``WIDE``
    optional properties. Also a cached lookup."""
    from transformers import AutoTokenizer

    from vlserve.engine.guided import GuideCompiler
    from vlserve.engine.request import Guide
    from vlserve.engine.vocab import TokenBytes

    def invoice(i: int) -> Guide:
        schema = json.loads(json.dumps(SCHEMA).replace('"vendor"', f'"vendor{i}"'))
        return Guide("json_schema", json.dumps(schema))

    def wide(i: int) -> Guide:
        props = {f"p{i}_{j}": {"type": "string"} for j in range(WIDE)}
        return Guide("json_schema", json.dumps({"type": "object", "properties": props}))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    t0 = time.perf_counter()
    compiler = GuideCompiler(
        TokenBytes(tokenizer, 151_936), tokenizer, [151645, 151643], workers=1, timeout_s=30
    )
    t1 = time.perf_counter()
    asyncio.run(compiler.obtain(invoice(-1)))  # waits for the worker to start
    times = {"setup_ms": (t1 - t0) * 1e3, "worker_start_ms": (time.perf_counter() - t1) * 1e3}
    for name, make in (("invoice", invoice), ("wide", wide)):
        here, there = [], []
        for i in range(schemas):
            start = time.perf_counter()
            compiler.compile(make(i))
            here.append(time.perf_counter() - start)
            start = time.perf_counter()
            asyncio.run(compiler.obtain(make(1000 + i)))
            there.append(time.perf_counter() - start)
        times[f"{name}_ms"] = statistics.median(here) * 1e3
        times[f"{name}_worker_ms"] = statistics.median(there) * 1e3
    start = time.perf_counter()
    compiler.compile(invoice(0))
    times["cached_ms"] = (time.perf_counter() - start) * 1e3
    compiler.shutdown()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=96, help="per load and round")
    ap.add_argument("--compile-only", action="store_true", help="only the compile times")
    args = ap.parse_args()

    from vlserve.testing import ensure_tiny_model
    from vlserve.testing.server import start_server, stop_server

    model = ensure_tiny_model()
    times = compile_times(model)
    print(
        f"grammar compiler setup (with json_object) {times['setup_ms']:.0f} ms, a grammar "
        f"worker's start {times['worker_start_ms']:.0f} ms; cached {times['cached_ms']:.3f} ms"
    )
    for name in ("invoice", "wide"):
        here, there = times[f"{name}_ms"], times[f"{name}_worker_ms"]
        print(
            f"{name} schema, cold: {here:.2f} ms in-process, {there:.2f} ms the server's way "
            f"(trial in a worker, then here): +{there - here:.2f} ms, {there / here:.2f}x"
        )
    if args.compile_only:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model, Path(tmp), "--max-num-seqs", str(CONCURRENCY))
        try:
            asyncio.run(_load(server.base_url, server.model, CONCURRENCY, 0.5))  # warm-up
            free, mixed = [], []
            for r in range(args.rounds):
                free.append(asyncio.run(_load(server.base_url, server.model, args.requests, 0.0)))
                mixed.append(asyncio.run(_load(server.base_url, server.model, args.requests, 0.5)))
                print(
                    f"round {r + 1}: free {free[-1]:.0f} tok/s, half constrained {mixed[-1]:.0f} tok/s"
                )
        finally:
            stop_server(server)
    ratio = statistics.median(mixed) / statistics.median(free)
    print(
        f"\nc={CONCURRENCY}, {MAX_TOKENS} tokens: free {statistics.median(free):.0f} tok/s, "
        f"half constrained {statistics.median(mixed):.0f} tok/s"
    )
    print(
        f"half constrained / free = {ratio:.2f}  (target >= 0.85: {'PASS' if ratio >= 0.85 else 'MISS'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
