"""Work reused across requests: 4-turn conversations about one 448x448 image (``--image-size``),
with and without the prefix and encoder caches.

A closed loop (`vlserve bench --random-turns 4`, streaming, greedy, ignore_eos) against a random
model served twice: with the defaults, and with `--no-prefix-cache --encoder-cache-mb 0`. Each
turn carries the whole history (the same image, the server's real answers). Prints TTFT p50 and
p99 per turn index for both servers and the cached / uncached ratio of turns 2-4 (target
<= 0.25), and checks that both servers gave identical answers.

The ratio depends on the model's proportions, so ``--shapes`` runs several (in order):
- ``tiny``, the test checkpoint: its layers are 1% of its 151936-row output head, so a turn's
  TTFT is mostly what no cache can save (HTTP, template, the output head, the step in flight);
- ``small`` (vlserve.testing.tiny_model.SMALL: 8 text layers of 512, 8 vision layers of 256),
  where the vision tower and the prefill, the work the caches exist to save, have some weight;
- ``8b``, Qwen3-VL-8B's dimensions, for an accelerator (``--device cuda --shapes 8b``).
``small`` and ``8b`` are served with ``--load-format dummy`` (random weights, no checkpoint).

    .venv/bin/python benchmarks/prefix_cache.py [--shapes tiny,small] [--device cpu]
        [--conversations 12] [--concurrency 4] [--max-tokens 32]
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

    server = start_server(model_path, work / label, *flags, timeout_s=900)
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
    parser.add_argument("--shapes", default="tiny,small", help="tiny, small, 8b; in order")
    parser.add_argument("--device", default="cpu", help="the servers' --device")
    parser.add_argument("--dtype", default="auto", help="the servers' --dtype")
    parser.add_argument("--conversations", type=int, default=12)
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
    """Serve one model with and without the caches; print the table; True if answers agree."""
    cached, cached_answers = run(model_path, "cached", flags, args, work)
    cold, cold_answers = run(
        model_path, "uncached", [*flags, "--no-prefix-cache", "--encoder-cache-mb", "0"], args, work
    )
    print(
        f"\n{args.conversations} conversations of {TURNS} turns about one {args.image_size} image, "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}; {shape} random Qwen3-VL on "
        f"{args.device} ({args.dtype})"
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
    return same


if __name__ == "__main__":
    sys.exit(main())
