"""The engine's KV cache: a preallocated pool of blocks, written in place, and the attention seam.

Layout: per layer, K and V are ``(num_blocks * block_size, kv_heads, head_dim)``; token ``p`` of a
sequence lives at slot ``block_table[p // block_size] * block_size + p % block_size``. A step
writes only its new tokens' K/V at their slots (``index_copy_``); nothing is concatenated.

The read path is the seam (``PagedCache.update``): the portable path, used on every device
today, gathers each row's slots into a right-padded ``(rows, kv_heads, kv_len, head_dim)`` view
for the model's own SDPA attention (one copy of the live tokens of one layer at a time, against
two copies of the whole padded cache per step before). A paged kernel (``flash_attn_with_kvcache``
with a block table on CUDA, torch_npu's paged attention on Ascend) would read the pool in place
instead, from the same ``StepLayout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from vlserve.engine.block_manager import NULL_BLOCK


class KVPool:
    """Preallocated K and V for every layer."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class RowSpan:
    """One row of a step: its block table and the positions ``[start, end)`` it computes."""

    block_table: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class StepLayout:
    """Where one forward writes and reads in the pool. Rows are right-padded to ``q_len``."""

    rows: int
    q_len: int
    kv_len: int
    write_slots: torch.Tensor  # (new tokens,) pool slots of the real new tokens, row-major
    write_index: torch.Tensor | None  # their indices in the flattened (rows * q_len); None: all
    read_blocks: torch.Tensor | None  # (rows * kv_len / block,) blocks to gather; None: keys are
    # the new ones (a prefill with nothing cached)
    mask: torch.Tensor  # (rows, 1, q_len, kv_len) bool: True where a query may attend
    last_index: torch.Tensor  # (rows,) the query index of each row's last real token
    # for kernels that read the pool in place (engine/paged_decode.py)
    block_tables: torch.Tensor  # (rows, width) int32, NULL_BLOCK past each row's blocks
    context_lens: torch.Tensor  # (rows,) int32: the positions each row sees (its end)


def bucket(n: int, step: int = 128) -> int:
    """Round up to a multiple of ``step``: few distinct decode shapes (graph capture later), at
    most ``step - 1`` padded positions."""
    return -(-n // step) * step


def row_bucket(rows: int) -> int:
    """Decode batch sizes padded to 1, 2, 4, 8, then multiples of 8: few shapes to capture."""
    if rows <= 8:
        return 1 << (rows - 1).bit_length()
    return -(-rows // 8) * 8


PAD_ROW = RowSpan([], 0, 1)  # a padding row: reads and writes the null block only


def build_layout(
    spans: list[RowSpan], block_size: int, device: torch.device, kv_bucket: int = 1
) -> StepLayout:
    """The layout of one forward over ``spans`` (a prefill, or a decode step with one token each).

    Query ``i`` of row ``b`` is position ``start_b + i``; it may attend to keys ``j <= start_b + i``
    and ``j < end_b``, which also gives padded queries (``i`` past the row's tokens) a non-empty,
    harmless row of attention.
    """
    rows = len(spans)
    starts = torch.tensor([s.start for s in spans], dtype=torch.long)
    ends = torch.tensor([s.end for s in spans], dtype=torch.long)
    q_lens = ends - starts
    q_len = int(q_lens.max())
    fresh = bool((starts == 0).all())
    kv_len = q_len if fresh else bucket(int(ends.max()), math.lcm(kv_bucket, block_size))
    width = -(-max(kv_len, q_len) // block_size)
    table = torch.tensor(
        [s.block_table[:width] + [NULL_BLOCK] * (width - len(s.block_table)) for s in spans],
        dtype=torch.long,
    )
    offsets = torch.arange(block_size, dtype=torch.long)
    slots = (table.unsqueeze(-1) * block_size + offsets).view(rows, -1)  # (rows, width*bs)
    q = torch.arange(q_len, dtype=torch.long)
    real = q.unsqueeze(0) < q_lens.unsqueeze(1)  # (rows, q_len)
    positions = (starts.unsqueeze(1) + q.unsqueeze(0)).clamp(max=slots.shape[1] - 1)
    write_slots = slots.gather(1, positions)[real]
    write_index = None if bool(real.all()) else real.view(-1).nonzero().view(-1)
    key = torch.arange(kv_len, dtype=torch.long).view(1, 1, kv_len)
    abs_q = (starts.unsqueeze(1) + q.unsqueeze(0)).unsqueeze(-1)  # (rows, q_len, 1)
    mask = (key <= abs_q) & (key < ends.view(rows, 1, 1))
    return StepLayout(
        rows=rows,
        q_len=q_len,
        kv_len=kv_len,
        write_slots=write_slots.to(device),
        write_index=None if write_index is None else write_index.to(device),
        read_blocks=None if fresh else table[:, : kv_len // block_size].reshape(-1).to(device),
        mask=mask.unsqueeze(1).to(device),
        last_index=(q_lens - 1).to(device),
        block_tables=table.to(device, torch.int32),
        context_lens=ends.to(device, torch.int32),
    )


class PagedCache(Cache):
    """A ``transformers`` Cache over the pool for one forward: writes the new K/V in place and
    returns what the model's attention reads (the portable gather)."""

    def __init__(self, pool: KVPool, layout: StepLayout) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.layout = layout

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        heads, dim = keys.shape[1], keys.shape[2]
        for pool_t, new in ((keys, key_states), (values, value_states)):
            flat = new.transpose(1, 2).reshape(-1, heads, dim)  # (rows * q_len, heads, dim)
            if lay.write_index is not None:
                flat = flat.index_select(0, lay.write_index)
            pool_t.index_copy_(0, lay.write_slots, flat.to(pool_t.dtype))
        if lay.read_blocks is None:
            return key_states, value_states
        # whole blocks: few large copies (a slot-by-slot gather measured about twice as slow)
        by_block = (self.pool.num_blocks, self.pool.block_size, heads, dim)
        shape = (lay.rows, lay.kv_len, heads, dim)
        k = keys.view(by_block).index_select(0, lay.read_blocks).view(shape).transpose(1, 2)
        v = values.view(by_block).index_select(0, lay.read_blocks).view(shape).transpose(1, 2)
        return k, v

    def get_seq_length(self, layer_idx: int | None = 0, *args: Any, **kwargs: Any) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.layout.kv_len, 0

    def get_max_length(self) -> int | None:
        return None

    @property
    def is_compileable(self) -> bool:
        return False
