"""Short chats arriving beside a long prompt: do they wait for its chunks, padded to them?

Each round sends one long text prompt (``--long-words``, 12,000 by default), then, 150 ms later
(its first chunk running), ``--shorts`` short chats with one 224x224 image each, all streaming,
max_tokens 16. Two servers run at once, this tree and ``--baseline-rev`` (a git worktree; default
the scheduler before its prefill budget counted padded positions), and take turns round by round.
Prints each round's TTFT of the long prompt, the short chats' TTFT p50 and max, and when all were
done; then the medians and the ratio this tree / baseline of the short chats' TTFT p50.

    .venv/bin/python benchmarks/long_prompt_burst.py [--rounds 3] [--baseline-rev 2c32a30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _baseline import worktree_src

if TYPE_CHECKING:
    import httpx

    from vlserve.testing.server import ServerProcess

SUM_BUDGET_REV = "2c32a30"  # the last commit whose prefill budget was a sum of new tokens


async def _one(
    client: httpx.AsyncClient, url: str, model: str, content: str | list, max_tokens: int = 16
) -> float:
    """Seconds to the first content token of one streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}  # fmt: skip
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("a stream ended without content")
    return ttft


async def _round(
    server: ServerProcess, seed: int, args: argparse.Namespace
) -> tuple[float, list[float], float]:
    import httpx

    from vlserve.bench.synthetic import png_data_url, random_png, random_text

    rng = random.Random(seed)
    long_text = random_text(args.long_words, rng)
    shorts = [
        [{"type": "image_url", "image_url": {"url": png_data_url(random_png(224, 224, rng))}},
         {"type": "text", "text": random_text(16, rng)}]
        for _ in range(args.shorts)
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        long_task = asyncio.create_task(_one(client, server.base_url, server.model, long_text))
        await asyncio.sleep(0.15)  # its first chunk is running
        short = await asyncio.gather(
            *(_one(client, server.base_url, server.model, c) for c in shorts)
        )
        long_ttft = await long_task
        return long_ttft, sorted(short), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-words", type=int, default=12_000)
    parser.add_argument("--shorts", type=int, default=12)
    parser.add_argument("--baseline-rev", default=SUM_BUDGET_REV)
    args = parser.parse_args()
    from vlserve.testing import ensure_tiny_model
    from vlserve.testing.server import start_server, stop_server

    model_path = ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="vlserve-burst-") as tmp:
        src = worktree_src(args.baseline_rev)
        servers = {}
        try:
            servers["this tree"] = start_server(model_path, Path(tmp) / "new")
            servers[args.baseline_rev] = start_server(
                model_path, Path(tmp) / "old", env={"PYTHONPATH": str(src)}
            )
            p50: dict[str, list[float]] = {name: [] for name in servers}
            for seed in range(args.rounds):
                for name, server in servers.items():
                    long_ttft, short, total = asyncio.run(_round(server, seed, args))
                    p50[name].append(statistics.median(short))
                    print(
                        f"{name:<10} round {seed}: long prompt TTFT {long_ttft:5.2f} s | "
                        f"{args.shorts} short chats TTFT p50 {statistics.median(short):5.2f} s, "
                        f"max {short[-1]:5.2f} s | all done {total:5.2f} s",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                stop_server(server)
    new, old = (statistics.median(v) for v in p50.values())
    print(f"\nshort chats' TTFT p50, median of rounds: this tree {new:.2f} s, "
          f"{args.baseline_rev} {old:.2f} s, ratio {new / old:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
