"""Qwen3-VL at the real 8B dimensions with random weights built on the device (no download).

Reports, for a lent GPU (or an NPU):
  - decode time per step at batch 1 against the memory-bandwidth floor
    (bytes of the weights a decode step reads ÷ measured device copy bandwidth);
  - output tokens/s at batch 1/8/32/64 for batched vs unbatched serving (the vlserve engine
    in-process, each request with its own random 448x448 image, max_tokens 64, ignore_eos).
Finishes in under 8 minutes on an H100; `--smoke` shrinks the model to check the script on CPU.

    python benchmarks/gpu_realsize.py [--device cuda] [--batches 1 8 32 64] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlserve.engine.device import DeviceInfo

MAX_TOKENS = 64


def _sync(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None:
        module.synchronize()


def build_model(model_dir: Path, info: DeviceInfo) -> torch.nn.Module:
    """Random weights of ``model_dir``'s shape, made on the device (``--load-format dummy``)."""
    from vlserve.engine.runner import load_model

    start = time.perf_counter()
    model = load_model(str(model_dir), info, "dummy")
    _sync(info.torch_device)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"built {params / 1e9:.2f} B parameters on {info.torch_device} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return model.eval()


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weights a decode step reads: the language model and lm_head, not the vision tower, and of
    the input embedding only the looked-up rows (ignored)."""
    total = 0
    for name, p in model.named_parameters():
        if "visual" in name or "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    return total


def step_time_batch1(runner, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """One row decoding against the paged KV pool, as the engine's step runs it."""
    from vlserve.engine.block_manager import BlockManager
    from vlserve.engine.prompt import ChatPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.sequence import Sequence

    text = {"type": "text", "text": "Describe the weather in one long sentence."}
    prepared = runner.preprocess(ChatPrompt([{"role": "user", "content": [text]}]))
    encoded = runner.encode([prepared])[0]
    blocks = BlockManager(65, 16, prefix_caching=False)
    runner.allocate_kv(65, 16)
    seq = Sequence.for_prompt("step", encoded, SamplingParams(max_tokens=1))
    blocks.allocate(seq)
    token = int(runner.run([seq], True).argmax())
    blocks.commit(seq, seq.num_tokens)
    seq.token_ids.append(token)
    blocks.append(seq)
    for _ in range(3):
        runner.run([seq], False)  # rewrites the same position: the same cost each time
    _sync(device)
    start = time.perf_counter()
    steps = 32
    for _ in range(steps):
        runner.run([seq], False)
    _sync(device)
    return (time.perf_counter() - start) / steps


def _requests(count: int, rng: random.Random):  # type: ignore[no-untyped-def]
    from PIL import Image

    for _ in range(count):
        image = Image.frombytes("RGB", (448, 448), rng.randbytes(448 * 448 * 3))
        yield [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": "Describe this image in detail."},
                ],
            }
        ]


def serve_tokens_per_s(
    model,
    model_dir,
    device_info,
    max_num_seqs: int,  # type: ignore[no-untyped-def]
    num_requests: int,
    seed: int,
) -> float:
    from vlserve.engine.engine import AsyncEngine, EngineConfig
    from vlserve.engine.prompt import ChatPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.runner import ModelRunner
    from vlserve.engine.scheduler import SchedulerConfig

    engine = AsyncEngine(
        EngineConfig(str(model_dir), SchedulerConfig(max_num_seqs=max_num_seqs)),
        device_info,
        runner_factory=lambda cache: ModelRunner(
            model_dir, device_info, model=model, encoder_cache=cache
        ),
    )
    engine.start()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    async def one(i: int, messages) -> int:  # type: ignore[no-untyped-def]
        count = 0
        async for event in await engine.generate(ChatPrompt(messages), params, f"r{i}"):
            if event.error is not None:
                raise event.error
            count = event.num_completion_tokens
        return count

    async def run() -> float:
        await engine.wait_ready()
        prompts = list(_requests(num_requests, random.Random(seed)))
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, m) for i, m in enumerate(prompts)))
        return sum(tokens) / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, npu or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--budget-s", type=float, default=420, help="skip levels after this")
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions, to test the script")
    args = parser.parse_args()

    from vlserve.engine.device import resolve_device
    from vlserve.testing.tiny_model import QWEN3_VL_8B, TINY, write_model_files

    begin = time.perf_counter()
    info = resolve_device(args.device, args.dtype)
    # config, processor, tokenizer and generation config (the real vocabulary); no weights
    with tempfile.TemporaryDirectory(prefix="vlserve-realsize-") as tmp:
        model_dir = Path(tmp)
        write_model_files(model_dir, shape=TINY if args.smoke else QWEN3_VL_8B)
        return measure(args, info, model_dir, begin)


def measure(args: argparse.Namespace, info: DeviceInfo, model_dir: Path, begin: float) -> int:
    device = info.torch_device
    model = build_model(model_dir, info)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")

    from vlserve.engine.runner import ModelRunner

    runner = ModelRunner(model_dir, info, model=model)
    bandwidth = copy_bandwidth(device, 64 if args.smoke else 2048)
    weight_bytes = decode_weight_bytes(model)
    floor_s = weight_bytes / bandwidth
    step_s = step_time_batch1(runner, device)
    print(
        f"\ndecode weights {weight_bytes / 2**30:.2f} GiB, copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s → floor {floor_s * 1000:.2f} ms/step"
    )
    print(
        f"decode step at batch 1: {step_s * 1000:.2f} ms = {step_s / floor_s:.2f}x the floor "
        f"({1 / step_s:.1f} tokens/s)"
    )

    print(f"\n{'batch':>5} {'batched tok/s':>14} {'unbatched tok/s':>16} {'ratio':>6}")
    unbatched = None
    for n in sorted(args.batches):
        if time.perf_counter() - begin > args.budget_s:
            print(f"{n:>5}  skipped: past the {args.budget_s:.0f} s budget")
            continue
        batched = serve_tokens_per_s(model, model_dir, info, n, n, seed=n)
        if unbatched is None:  # one request at a time: the rate does not depend on the load
            unbatched = serve_tokens_per_s(model, model_dir, info, 1, 4, seed=0)
        print(f"{n:>5} {batched:>14.1f} {unbatched:>16.1f} {batched / unbatched:>6.2f}")
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
