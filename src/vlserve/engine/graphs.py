"""The decode step captured as a device graph per row bucket, over static input buffers.

A decode step of the compact forward with paged attention has shapes that depend only on its
row count: ids ``(rows,)``, MRoPE positions ``(3, rows, 1)``, the new tokens' pool slots
``(rows,)``, block tables ``(rows, width)`` and context lengths ``(rows,)``. So it is captured
once per row bucket (``kv_cache.row_bucket``: 1, 2, 4, 8, then multiples of 8) up to the batch's
``max_num_seqs``, largest first, sharing one memory pool; a step copies its rows into the
buffers (padding rows read and write the null block) and replays the smallest bucket that
holds them: one launch instead of one per kernel, and no Python per layer.

``DeviceGraph`` is the small interface a device's graph API fills: ``CudaGraph`` today (the
NPU's ``torch_npu.npu.NPUGraph`` has the same capture/replay shape and can fill it later).
``StaticGraph`` runs the same static-buffer path without capturing, which tests it on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vlserve.engine.attention import PoolAttention
from vlserve.engine.kv_cache import StepLayout, row_bucket

if TYPE_CHECKING:
    from vlserve.engine.runner import ModelRunner
    from vlserve.engine.sequence import Sequence as Seq

log = logging.getLogger(__name__)


class DeviceGraph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record ``fn``'s device work; return its output (a tensor that replays refill)."""
        ...

    def replay(self) -> None: ...


class CudaGraph:
    """A CUDA graph in a memory pool shared by all buckets."""

    def __init__(self, pool: Any) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()  # warm-up off the capture, as PyTorch requires
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class StaticGraph:
    """No capture: ``replay`` runs the function again on the same buffers (CPU, tests)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


def graph_factory(device_type: str, mode: str) -> Callable[[], DeviceGraph] | None:
    """What makes the step's graphs: ``mode`` ``auto`` (the device's graphs: CUDA; none on the
    CPU, where a launch costs nothing), ``none`` (``--enforce-eager``) or ``static``."""
    if mode == "none" or (mode == "auto" and device_type != "cuda"):
        return None
    if mode == "static":
        return StaticGraph
    if mode != "auto":
        raise ValueError(f"decode graph mode must be auto, none or static, got {mode!r}")
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


class DecodeGraphs:
    """Static buffers and one captured decode step per row bucket up to ``max_rows``."""

    def __init__(self, runner: ModelRunner, max_rows: int, make: Callable[[], DeviceGraph]) -> None:
        if runner.text is None or runner.pool is None or not runner.paged_decode:
            raise ValueError("decode graphs need the compact forward, paged attention and a pool")
        self.runner = runner
        self.text, self.pool = runner.text, runner.pool
        self.make = make
        self.max_rows = row_bucket(max_rows)
        pool = runner.pool
        dev = runner.device.torch_device
        rows = self.max_rows
        self.width = -(-runner.max_model_len // pool.block_size)  # blocks of the longest row
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, rows, 1, dtype=torch.long, device=dev)
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)  # 0: the null block's
        self.tables = torch.zeros(rows, self.width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[DeviceGraph, torch.Tensor]] = {}

    @property
    def buckets(self) -> list[int]:
        return sorted({row_bucket(n) for n in range(1, self.max_rows + 1)})

    def capture(self) -> None:
        """Capture every bucket, largest first (the pool's memory serves the smaller ones)."""
        start = time.perf_counter()
        before = _allocated(self.runner)
        for rows in reversed(self.buckets):
            graph = self.make()
            out = graph.capture(lambda rows=rows: self._forward(rows))  # type: ignore[misc]
            self.graphs[rows] = (graph, out)
        log.info(
            "captured the decode step for %d row buckets (1..%d) in %.1f s, %.0f MiB",
            len(self.graphs),
            self.max_rows,
            time.perf_counter() - start,
            (_allocated(self.runner) - before) / 2**20,
        )

    @torch.inference_mode()
    def _forward(self, rows: int) -> torch.Tensor:
        """The decode step of the first ``rows`` buffer rows: logits (rows, vocab) float32."""
        text, model = self.text, self.runner.model
        layout = StepLayout(
            rows=rows,
            q_len=1,
            kv_len=0,
            write_slots=self.slots[:rows],
            write_index=None,
            read_blocks=None,
            mask=self.lens[:0],  # unused: the paged kernel reads lengths, not a mask
            last_index=self.lens[:0],
            block_tables=self.tables[:rows],
            context_lens=self.lens[:rows],
        )
        attention = PoolAttention(self.pool, layout, text.scale, paged=True)
        embeds = model.get_input_embeddings()(self.ids[:rows])
        hidden = text.forward(embeds, self.positions[:, :rows], attention)
        return model.lm_head(hidden[:, 0]).float()

    def run(self, seqs: Sequence[Seq]) -> torch.Tensor:
        """One decode step of ``seqs`` (each computes its newest token): their logits."""
        n = len(seqs)
        rows = row_bucket(n)
        graph, out = self.graphs[rows]
        block = self.pool.block_size
        pos = [s.num_tokens - 1 for s in seqs]
        width = max(-(-(p + 1) // block) for p in pos)  # columns the longest row reads
        padded = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
        tables = torch.tensor(padded + [[0] * width] * (rows - n), dtype=torch.int32)
        ids = [s.token_ids[-1] for s in seqs] + [0] * (rows - n)
        mrope = [p + s.prompt.rope_delta for p, s in zip(pos, seqs, strict=True)] + [0] * (rows - n)
        slots = [
            s.block_table[p // block] * block + p % block for s, p in zip(seqs, pos, strict=True)
        ]
        self.ids[:rows, 0].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:, :rows, 0].copy_(torch.tensor(mrope).expand(3, rows), non_blocking=True)
        self.slots[:rows].copy_(torch.tensor(slots + [0] * (rows - n)), non_blocking=True)
        self.tables[:rows, :width].copy_(tables, non_blocking=True)
        self.lens[:rows].copy_(
            torch.tensor([p + 1 for p in pos] + [1] * (rows - n)), non_blocking=True
        )
        graph.replay()
        return out[:n]


def _allocated(runner: ModelRunner) -> int:
    return torch.cuda.memory_allocated() if runner.device.type == "cuda" else 0
