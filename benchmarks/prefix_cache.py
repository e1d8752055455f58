"""Work reused across requests: 4-turn conversations about one 448x448 image (``--image-size``),
with and without the prefix and encoder caches.

A closed loop (`vlserve bench --random-turns 4`, streaming, greedy, ignore_eos) against the tiny
model served twice: with the defaults, and with `--no-prefix-cache --encoder-cache-mb 0`. Each
turn carries the whole history (the same image, the server's real answers). Prints TTFT p50 and
p99 per turn index for both servers and the cached / uncached ratio of turns 2-4 (target
<= 0.25), and checks that both servers gave identical answers.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 12] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TURNS = 4


def run(
    model_path: Path, label: str, flags: list[str], args: argparse.Namespace, work: Path
) -> tuple[dict, dict[str, str]]:
    from vlserve.testing.server import start_server, stop_server

    server = start_server(model_path, work / label, *flags)
    out = work / f"{label}.jsonl"
    try:
        cmd = [
            sys.executable, "-m", "vlserve", "bench", "--url", server.base_url,
            "--model", server.model, "--dataset", "random", "--random-turns", str(TURNS),
            "--random-images", "1", "--random-image-size", args.image_size,
            "--random-input-len", "16", "--random-followup-len", "16",
            "--num-requests", str(args.conversations), "--max-concurrency", str(args.concurrency),
            "--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
            "--seed", "0", "--output", str(out), "--summary", f"{out}.summary.json",
            "--no-plots", "--no-progress", "--log-level", "WARNING",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    finally:
        stop_server(server)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    answers = {}
    for line in out.read_text().splitlines():
        row = json.loads(line)
        if row.get("success"):
            answers[row["request_id"]] = row.get("response") or ""
    return summary, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", default="448x448", help="WxH of the conversation's image")
    args = parser.parse_args()
    from vlserve.testing import ensure_tiny_model

    model_path = ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="vlserve-prefix-") as tmp:
        work = Path(tmp)
        cached, cached_answers = run(model_path, "cached", [], args, work)
        cold, cold_answers = run(
            model_path, "uncached", ["--no-prefix-cache", "--encoder-cache-mb", "0"], args, work
        )
    print(
        f"\n{args.conversations} conversations of {TURNS} turns about one {args.image_size} image, "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}; tiny Qwen3-VL, fp32, CPU"
    )
    print(
        f"{'turn':>4} {'prompt tok':>10} {'cached p50':>11} {'p99':>7} {'uncached p50':>13} {'p99':>7} {'ratio':>6}   (TTFT ms)"
    )
    ratios = []
    for warm, cool in zip(cached["turns"], cold["turns"], strict=True):
        turn = warm["turn"] + 1
        ratio = warm["ttft_ms"]["median"] / cool["ttft_ms"]["median"]
        if turn > 1:
            ratios.append(ratio)
        prompt = warm.get("prompt_tokens_mean") or 0
        print(
            f"{turn:>4} {prompt:>10.0f} {warm['ttft_ms']['median']:>11.1f} {warm['ttft_ms']['p99']:>7.1f} "
            f"{cool['ttft_ms']['median']:>13.1f} {cool['ttft_ms']['p99']:>7.1f} {ratio:>6.2f}"
        )  # fmt: skip
    worst = max(ratios)
    print(f"  turns 2-{TURNS}: cached / uncached TTFT p50, worst turn  {worst:.2f}  (target <= 0.25)  {'PASS' if worst <= 0.25 else 'MISS'}")  # fmt: skip
    same = cached_answers == cold_answers and len(cached_answers) == args.conversations * TURNS
    print(f"  identical answers with and without the caches ({len(cached_answers)} turns)  {'PASS' if same else 'FAIL'}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
