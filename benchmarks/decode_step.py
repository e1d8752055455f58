"""One decode step, by forward and attention and graph, against the memory-bandwidth floor.

Qwen3-VL at the real 8B dimensions with random weights made on the device (no download), or the
tiny shape with ``--smoke``. For each variant, the same rows (a short prompt each) are
prefilled into the variant's own KV pool, then decode steps are timed at each batch:

  transformers          HF's forward of the text stack, the pool gathered (--model-impl transformers)
  vlserve-gather        our compact forward, the pool gathered (portable attention)
  vlserve-paged         our compact forward, the Triton paged kernel reading the pool in place
  vlserve-paged-graph   the same, captured as a device graph per row bucket (the default on CUDA)

and then a torch.profiler table of the top 15 operations of one eager paged step at the
smallest and the largest batch. The floor is the bytes of weights a decode step reads over
the device's measured copy bandwidth. Every figure is written as a JSON line as soon as it is
measured (``--jsonl``), so a run cut short keeps what it measured; variants the device cannot
run (paged and graphs on a CPU) are reported as skipped.

    python benchmarks/decode_step.py [--device cuda] [--batches 1 64] [--jsonl FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_realsize import _sync as sync
from gpu_realsize import copy_bandwidth, decode_weight_bytes

VARIANTS = {  # name: (model_impl, attention, decode graph)
    "transformers": ("transformers", "portable", "none"),
    "vlserve-gather": ("vlserve", "portable", "none"),
    "vlserve-paged": ("vlserve", "paged", "none"),
    "vlserve-paged-graph": ("vlserve", "paged", "auto"),
}


class Results:
    """JSON lines, printed and appended to a file as they come."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def emit(self, kind: str, **values: Any) -> None:
        line = json.dumps({"kind": kind, **values})
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")


def floor_ms(model: torch.nn.Module, device: torch.device, smoke: bool) -> tuple[float, float]:
    """(decode weight GiB, floor ms per step): the weights a decode step reads over the
    device's measured copy bandwidth (gpu_realsize.py's measures)."""
    weights = decode_weight_bytes(model)
    return weights / 2**30, weights / copy_bandwidth(device, 64 if smoke else 2048) * 1000


def prepared_rows(runner, batch: int):  # type: ignore[no-untyped-def]
    """``batch`` rows prefilled into ``runner``'s pool (from its start): the sequences to
    decode. The pool stays the one the graphs were captured over."""
    from vlserve.engine.block_manager import BlockManager
    from vlserve.engine.prompt import ChatPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.sequence import Sequence

    blocks = BlockManager(runner.pool.num_blocks, 16, prefix_caching=False)  # the same pool
    seqs = []
    for row in range(batch):
        text = {"type": "text", "text": f"Describe the weather in one long sentence, {row}."}
        prepared = runner.preprocess(ChatPrompt([{"role": "user", "content": [text]}]))
        seq = Sequence.for_prompt(f"r{row}", runner.encode([prepared])[0], SamplingParams())
        blocks.allocate(seq)
        token = int(runner.run([seq], True).argmax())
        blocks.commit(seq, seq.num_tokens)
        seq.token_ids.append(token)
        blocks.append(seq)
        seqs.append(seq)
    return seqs


def step_ms(runner, seqs, device: torch.device, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median of 3 timed runs of ``steps`` decode steps (each rewrites the same position)."""
    for _ in range(3):
        runner.run(seqs, False)
    runs = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            runner.run(seqs, False)
        sync(device)
        runs.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(runs)


def variant_runner(name: str, model, model_dir: Path, info, max_rows: int):  # type: ignore[no-untyped-def]
    from vlserve.engine.graphs import DecodeGraphs, graph_factory
    from vlserve.engine.runner import ModelRunner

    impl, attention, graph = VARIANTS[name]
    if attention == "paged":
        from vlserve.engine.paged_decode import self_check

        problem = self_check(info.torch_device, info.dtype)
        if problem is not None:
            raise RuntimeError(f"the paged kernel is not usable here: {problem}")
    runner = ModelRunner(model_dir, info, model=model, model_impl=impl, attention=attention)
    make = graph_factory(info.type, graph) if graph != "none" else None
    if graph != "none" and make is None:
        raise RuntimeError(f"no device graphs on {info.type}")
    runner.allocate_kv(max_rows * 4 + 1, 16)  # every batch's rows, in one pool
    if make is not None:
        runner.graphs = DecodeGraphs(runner, max_rows, make)
        start = time.perf_counter()
        runner.graphs.capture()
        return runner, time.perf_counter() - start
    return runner, 0.0


def profile_table(runner, seqs, device: torch.device) -> str:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runner.run(seqs, False)
    sync(device)
    with profile(activities=activities) as prof:
        runner.run(seqs, False)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jsonl", default=None, help="append each result as a JSON line")
    parser.add_argument("--smoke", action="store_true", help="the tiny shape, to test the script")
    args = parser.parse_args()
    from vlserve.engine.device import resolve_device
    from vlserve.engine.runner import load_model
    from vlserve.testing.tiny_model import QWEN3_VL_8B, TINY, write_model_files

    out = Results(args.jsonl)
    info = resolve_device(args.device, args.dtype)
    device = info.torch_device
    with tempfile.TemporaryDirectory(prefix="vlserve-decode-step-") as tmp:
        model_dir = Path(tmp)
        write_model_files(model_dir, shape=TINY if args.smoke else QWEN3_VL_8B)
        start = time.perf_counter()
        model = load_model(str(model_dir), info, "dummy").eval()
        sync(device)
        gib, floor = floor_ms(model, device, args.smoke)
        out.emit("floor", weights_gib=round(gib, 3), floor_ms=round(floor, 4),
                 build_s=round(time.perf_counter() - start, 1))  # fmt: skip
        for name in args.variants:
            try:
                runner, capture_s = variant_runner(name, model, model_dir, info, max(args.batches))
            except Exception as exc:
                out.emit("step", variant=name, skipped=f"{type(exc).__name__}: {exc}"[:300])
                continue
            for batch in sorted(args.batches):
                ms = step_ms(runner, prepared_rows(runner, batch), device, args.steps)
                out.emit("step", variant=name, batch=batch, ms=round(ms, 3),
                         x_floor=round(ms / floor, 2), capture_s=round(capture_s, 1))  # fmt: skip
        eager = "vlserve-paged" if device.type == "cuda" else "vlserve-gather"
        for batch in sorted({min(args.batches), max(args.batches)}):
            runner, _ = variant_runner(eager, model, model_dir, info, batch)
            table = profile_table(runner, prepared_rows(runner, batch), device)
            out.emit("profile", batch=batch, table=table)
            print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
