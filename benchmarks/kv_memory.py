"""The KV cache: memory reserved against what the real tokens need, and decode-step time against
the previous (left-padded, re-concatenated) engine.

1. Memory, on the tiny model in-process: one 8k-token request among 31 short ones, all running.
   Reserved = KV blocks held x block size; needed = the tokens the running rows really have.
   The previous engine reserved rows x its longest row (a left-padded tensor). Target: <= 1.3x.
2. Decode step, on a random Qwen3-VL text model (hidden 512, 8 layers, 8 heads / 2 KV heads,
   fp32, 1 thread, batch 8), at 256- and 2048-token contexts, median ms per step, against the
   engine of ``--baseline-rev`` (default: the commit before engine v2), imported from a git
   worktree in a subprocess. Target at 2048: new / previous <= 0.85.

    .venv/bin/python benchmarks/kv_memory.py [--baseline-rev REV] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _baseline import BASELINE_REV, REPO, worktree_src

CONTEXTS = (256, 2048)
BATCH = 8


def memory_case() -> dict:
    import asyncio

    import torch

    from vlserve.engine.device import DeviceInfo
    from vlserve.engine.engine import AsyncEngine, EngineConfig, EngineHooks
    from vlserve.engine.prompt import ChatPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.scheduler import SchedulerConfig
    from vlserve.testing import ensure_tiny_model

    peak = {"reserved": 0, "needed": 0, "rows": 0, "longest": 0}
    engine: AsyncEngine

    def on_step(step) -> None:  # type: ignore[no-untyped-def]
        loop = engine.loop
        if loop is None or step.is_prefill:
            return
        running = loop.scheduler.running
        reserved = loop.blocks.num_used_blocks * loop.blocks.block_size
        if len(running) >= peak["rows"] and reserved >= peak["reserved"]:
            peak.update(
                reserved=reserved,
                needed=sum(s.num_tokens for s in running),
                rows=len(running),
                longest=max(s.num_tokens for s in running),
            )

    engine = AsyncEngine(
        EngineConfig(
            str(ensure_tiny_model()),
            SchedulerConfig(max_num_seqs=32, max_prefill_tokens=16384),
            kv_cache_tokens=65536,
            prefix_caching=False,  # count each row's own blocks
        ),
        DeviceInfo("cpu", torch.float32),
        hooks=EngineHooks(on_step=on_step),
    )
    engine.start()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]

    async def one(i: int, n_words: int) -> None:
        text = " ".join(words[(i + k) % len(words)] for k in range(n_words)) + f" #{i}"
        prompt = ChatPrompt([{"role": "user", "content": [{"type": "text", "text": text}]}])
        stream = await engine.generate(
            prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), f"m{i}"
        )
        async for _ in stream:
            pass

    async def main() -> None:
        await engine.wait_ready()
        await asyncio.gather(one(0, 7950), *(one(i, 40 + 7 * i) for i in range(1, 32)))

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    peak["padded_before"] = peak["rows"] * peak["longest"]
    return peak


def _text_model():  # type: ignore[no-untyped-def]
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vlserve.testing.tiny_model import tiny_config

    cfg = tiny_config(tied=False)
    cfg["text_config"].update(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration._from_config(
        Qwen3VLConfig(**cfg), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def step_times(steps: int) -> dict[int, float]:
    """Median decode-step ms per context, with whichever engine is importable (run in a
    subprocess, once per engine)."""
    import torch

    torch.set_num_threads(1)
    import vlserve.engine.runner as runner_mod
    from vlserve.engine.device import DeviceInfo
    from vlserve.testing import ensure_tiny_model

    model = _text_model()
    path = ensure_tiny_model()
    device = DeviceInfo("cpu", torch.float32)
    runner = runner_mod.ModelRunner(path, device, model=model)
    out = {}
    for context in CONTEXTS:
        step = (_old_step if hasattr(runner_mod, "DecodeBatch") else _new_step)(runner, context)
        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1000)
        out[context] = statistics.median(times)
    return out


def _prompt_ids(context: int, row: int) -> list[int]:
    return [(1000 + 37 * row + 11 * i) % 150000 for i in range(context)]


def _old_step(runner, context: int):  # type: ignore[no-untyped-def]
    """The previous engine: prefill rows, join a DecodeBatch, decode (the cache stays at about
    ``context``: each timed step is one append on a cache of that length)."""
    import torch

    from vlserve.engine.runner import DecodeBatch  # type: ignore[attr-defined]

    batch = DecodeBatch(torch.device("cpu"))
    for row in range(BATCH):
        ids = torch.tensor([_prompt_ids(context, row)])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch.add(runner.prefill([inputs]))
    state = {"kv": batch.kv, "mask": batch.mask, "pos": list(batch.positions)}

    def step() -> None:
        batch.kv, batch.mask, batch.positions = state["kv"], state["mask"], list(state["pos"])
        runner.decode(batch, [7] * BATCH)

    return step


def _new_step(runner, context: int):  # type: ignore[no-untyped-def]
    """Engine v2: rows prefilled into the paged pool, then one decode step at ``context``."""
    from vlserve.engine.block_manager import BlockManager
    from vlserve.engine.prompt import EncodedPrompt, PreparedPrompt
    from vlserve.engine.request import SamplingParams
    from vlserve.engine.sequence import Sequence

    block = 16
    blocks = BlockManager(BATCH * (context // block + 2) + 1, block, prefix_caching=False)
    runner.allocate_kv(blocks.num_blocks + 1, block)
    import torch

    seqs = []
    for row in range(BATCH):
        ids = _prompt_ids(context, row)
        prepared = PreparedPrompt(ids, (), {})
        positions = torch.arange(context).view(1, -1).expand(4, -1).clone()
        encoded = EncodedPrompt(prepared, positions, 0)
        seq = Sequence.for_prompt(f"r{row}", encoded, SamplingParams(max_tokens=1))
        blocks.allocate(seq)
        runner.run([seq], True)
        blocks.commit(seq, seq.num_tokens)
        seq.token_ids.append(7)
        blocks.append(seq)
        seqs.append(seq)

    def step() -> None:
        runner.run(seqs, False)  # rewrites the same position each time: same cost

    return step


def _baseline_times(rev: str, steps: int) -> dict[int, float]:
    return _times_in(worktree_src(rev), steps)


def _times_in(src: Path, steps: int) -> dict[int, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import kv_memory, json; "
        f"print(json.dumps(kv_memory.step_times({steps})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        m = memory_case()
        ratio = m["reserved"] / m["needed"]
        print(
            f"memory: {m['rows']} rows, longest {m['longest']} tokens: KV reserved "
            f"{m['reserved']} tokens for {m['needed']} real tokens"
        )
        print(f"  previous engine (rows x longest row): {m['padded_before']} tokens")
        print(f"  reserved / needed                       {ratio:.3f}  (target <= 1.3)  "
              f"{'PASS' if ratio <= 1.3 else 'FAIL'}")  # fmt: skip
    new, old = {}, {}
    for _ in range(2):  # interleaved, twice: the machine is noisy
        old_run = _baseline_times(args.baseline_rev, args.steps)
        new_run = _times_in(REPO / "src", args.steps)
        for c in CONTEXTS:
            old.setdefault(c, []).append(old_run[c])
            new.setdefault(c, []).append(new_run[c])
    print(f"decode step, batch {BATCH}, hidden 512, 8 layers, fp32, 1 thread (median ms)")
    for c in CONTEXTS:
        o, n = min(old[c]), min(new[c])
        verdict = f"(target <= 0.85)  {'PASS' if n / o <= 0.85 else 'FAIL'}" if c == 2048 else ""
        print(
            f"  context {c:5d}: previous {o:6.1f}  v2 {n:6.1f}  v2/previous {n / o:.2f} {verdict}"
        )


if __name__ == "__main__":
    main()
