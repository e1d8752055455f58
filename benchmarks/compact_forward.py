"""Decode-step time of the text stack's two forwards: vlserve's compact one over the pool
(``--model-impl vlserve``, the default) against transformers' (``--model-impl transformers``).

One random Qwen3-VL text model (hidden 512, 8 layers, 8 heads / 2 KV heads, fp32; as
``kv_memory.py``), the same rows prefilled into each runner's pool, then decode steps timed in
interleaved rounds, median ms per step, per batch size. On a CPU this measures the host-side
cost each forward adds per step (module dispatch, the Cache object, mask building), which is
what dominates a small model's step on an accelerator; the device figures come from
``benchmarks/device_check.sh``. Target: compact / transformers <= 1.0 at every batch.

    .venv/bin/python benchmarks/compact_forward.py [--rounds N] [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import kv_memory  # the benchmark model and the prefilled decode step

BATCHES = (1, 8, 32)
CONTEXT = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from vlserve.engine.device import DeviceInfo
    from vlserve.engine.runner import ModelRunner
    from vlserve.testing import ensure_tiny_model

    model = kv_memory._text_model()
    path = ensure_tiny_model()
    device = DeviceInfo("cpu", torch.float32)
    times: dict[tuple[str, int], list[float]] = {}
    steps = {}
    for impl in ("vlserve", "transformers"):
        for batch in BATCHES:
            kv_memory.BATCH = batch
            runner = ModelRunner(path, device, model=model, model_impl=impl)
            steps[impl, batch] = kv_memory._new_step(runner, CONTEXT)
    for _ in range(args.rounds):
        for key, step in steps.items():
            step()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.setdefault(key, []).append((time.perf_counter() - t) * 1000 / args.steps)
    print(
        f"decode step, context {CONTEXT}, {args.threads} thread(s), median of {args.rounds} rounds"
    )
    print(f"{'batch':>5} {'vlserve ms':>11} {'transformers ms':>16} {'ratio':>6}")
    for batch in BATCHES:
        ours = statistics.median(times["vlserve", batch])
        theirs = statistics.median(times["transformers", batch])
        print(f"{batch:>5} {ours:>11.2f} {theirs:>16.2f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
