"""Work reused across requests: 4-turn conversations about one 448x448 image (``--image-size``),
with and without the prefix and encoder caches.

A closed loop (`vlserve bench --random-turns 4`, streaming, greedy, ignore_eos) against a random
model served twice at once: with the defaults, and with `--no-prefix-cache --encoder-cache-mb 0`.
Each turn carries the whole history (the same image, the server's real answers). The two servers
take turns, round by round (``--rounds``, each on new images), so that a slow minute of a shared
machine falls on both. Prints TTFT p50 and p99 per turn index over all rounds for both servers and
the cached / uncached ratio of turns 2-4 (target <= 0.25), and checks that both servers gave
identical answers.

The ratio depends on the model's proportions, so ``--shapes`` runs several (in order):
- ``tiny``, the test checkpoint: its layers are 1% of its 151936-row output head, so a turn's
  TTFT is mostly what no cache can save (HTTP, template, the output head, the step in flight);
- ``small`` (vlserve.testing.tiny_model.SMALL: 8 text layers of 512, 8 vision layers of 256),
  where the vision tower and the prefill, the work the caches exist to save, have some weight;
- ``8b``, Qwen3-VL-8B's dimensions, for an accelerator (``--device cuda --shapes 8b``).
``small`` and ``8b`` are served with ``--load-format dummy`` (random weights, no checkpoint).

    .venv/bin/python benchmarks/prefix_cache.py [--shapes tiny,small] [--device cpu]
        [--conversations 8] [--rounds 2] [--concurrency 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlserve.testing.server import ServerProcess

TURNS = 4


def bench_rows(
    server: ServerProcess, label: str, seed: int, args: argparse.Namespace, work: Path
) -> list[dict]:
    """One round: ``args.conversations`` conversations (images and words drawn from ``seed``)
    against ``server``; returns its result rows."""
    out = work / f"{label}-{seed}.jsonl"
    cmd = [
        sys.executable, "-m", "vlserve", "bench", "--url", server.base_url,
        "--model", server.model, "--dataset", "random", "--random-turns", str(TURNS),
        "--random-images", "1", "--random-image-size", args.image_size,
        "--random-input-len", "16", "--random-followup-len", "16",
        "--num-requests", str(args.conversations), "--max-concurrency", str(args.concurrency),
        "--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
        "--seed", str(seed), "--output", str(out), "--no-plots", "--no-progress",
        "--log-level", "WARNING",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in out.read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small", help="tiny, small, 8b; in order")
    parser.add_argument("--device", default="cpu", help="the servers' --device")
    parser.add_argument("--dtype", default="auto", help="the servers' --dtype")
    parser.add_argument("--conversations", type=int, default=8, help="per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds, alternating between the two servers, each on new images (default 2)",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", default="448x448", help="WxH of the conversation's image")
    args = parser.parse_args()
    from vlserve.testing.tiny_model import QWEN3_VL_8B, SMALL, ensure_tiny_model, write_model_files

    dummies = {"small": SMALL, "8b": QWEN3_VL_8B}
    names = [name.strip() for name in args.shapes.split(",") if name.strip()]
    if not names or any(name != "tiny" and name not in dummies for name in names):
        parser.error("--shapes takes a comma-separated list of tiny, small and 8b")
    ok = True
    for name in names:
        with tempfile.TemporaryDirectory(prefix="vlserve-prefix-") as tmp:
            work = Path(tmp)
            flags = ["--device", args.device, "--dtype", args.dtype]
            if args.device != "cpu":  # two servers share one device: a KV cache each, not 80%
                flags += ["--kv-cache-tokens", "131072"]
            if name == "tiny":
                model_path = ensure_tiny_model()
            else:  # config, tokenizer and processor files only: random weights on the device
                model_path = work / "model"
                model_path.mkdir()
                write_model_files(model_path, shape=dummies[name])
                flags += ["--load-format", "dummy"]
            ok = compare(model_path, name, flags, args, work) and ok
    return 0 if ok else 1


def compare(
    model_path: Path, shape: str, flags: list[str], args: argparse.Namespace, work: Path
) -> bool:
    """Serve one model with and without the caches, in alternating rounds; print the table;
    True if the answers agree."""
    from vlserve.testing.server import start_server, stop_server

    uncached = [*flags, "--no-prefix-cache", "--encoder-cache-mb", "0"]
    rows: dict[str, list[dict]] = {"cached": [], "uncached": []}
    servers: list[ServerProcess] = []
    try:
        for label, extra in (("cached", flags), ("uncached", uncached)):
            servers.append(start_server(model_path, work / label, *extra, timeout_s=900))
        for seed in range(args.rounds):
            for label, server in zip(rows, servers, strict=True):
                rows[label] += [
                    {**row, "round": seed} for row in bench_rows(server, label, seed, args, work)
                ]
    finally:
        for server in servers:
            stop_server(server)
    total = args.rounds * args.conversations
    print(
        f"\n{total} conversations ({args.rounds} rounds, alternating) of {TURNS} turns about one "
        f"{args.image_size} image, concurrency {args.concurrency}, max_tokens {args.max_tokens}; "
        f"{shape} random Qwen3-VL on {args.device} ({args.dtype})"
    )
    print(
        f"{'turn':>4} {'prompt tok':>10} {'cached p50':>11} {'p99':>7} {'uncached p50':>13} {'p99':>7} {'ratio':>6}   (TTFT ms)"
    )
    ratios = []
    for turn in range(TURNS):
        warm, cool = (_ttfts(rows[label], turn) for label in ("cached", "uncached"))
        ratio = _pct(warm, 50) / _pct(cool, 50)
        if turn > 0:
            ratios.append(ratio)
        prompts = [r["prompt_tokens"] for r in rows["cached"] if r.get("turn") == turn]
        prompt = statistics.mean(p for p in prompts if p) if any(prompts) else 0
        print(
            f"{turn + 1:>4} {prompt:>10.0f} {_pct(warm, 50):>11.1f} {_pct(warm, 99):>7.1f} "
            f"{_pct(cool, 50):>13.1f} {_pct(cool, 99):>7.1f} {ratio:>6.2f}"
        )  # fmt: skip
    worst = max(ratios)
    print(f"  turns 2-{TURNS}: cached / uncached TTFT p50, worst turn  {worst:.2f}  (target <= 0.25)  {'PASS' if worst <= 0.25 else 'MISS'}")  # fmt: skip
    answers = {label: _answers(rows[label]) for label in rows}
    same = answers["cached"] == answers["uncached"] and len(answers["cached"]) == total * TURNS
    print(f"  identical answers with and without the caches ({len(answers['cached'])} turns)  {'PASS' if same else 'FAIL'}")  # fmt: skip
    return same


def _ttfts(rows: list[dict], turn: int) -> list[float]:
    return [r["ttft_ms"] for r in rows if r.get("turn") == turn and r.get("success")]


def _pct(values: list[float], q: float) -> float:
    from vlserve.bench.metrics import percentile

    return percentile(sorted(values), q) if values else float("nan")


def _answers(rows: list[dict]) -> dict[tuple[int, str], str]:
    return {
        (r["round"], r["request_id"]): r.get("response") or "" for r in rows if r.get("success")
    }


if __name__ == "__main__":
    sys.exit(main())
