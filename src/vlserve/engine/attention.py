"""The attention seam of the compact forward: one step's K/V written into the pool in place, and
the keys each query may see read back.

``PoolAttention`` is the portable path (every device): new K/V go to their slots with
``index_copy_``; a step with cached positions gathers each row's blocks into a right-padded view
and runs SDPA under the step's mask (``kv_cache.StepLayout``). With ``paged``, a decode step
reads the pool in place instead (``engine.paged_decode``, a Triton kernel), behind the same
call; the runner chooses once at startup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlserve.engine.kv_cache import KVPool, StepLayout
from vlserve.engine.paged_decode import paged_decode


class PoolAttention:
    """Attention of one forward over the pool: portable (gather + SDPA), or with ``paged``, a
    decode step (one query per row) through the paged kernel, which reads the pool in place."""

    def __init__(self, pool: KVPool, layout: StepLayout, scale: float, paged: bool = False) -> None:
        self.pool = pool
        self.layout = layout
        self.scale = scale
        self.paged = paged

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new K/V, (rows, q_len, kv_heads, dim), at their slots."""
        lay = self.layout
        for pool_t, new in ((self.pool.keys[layer], k), (self.pool.values[layer], v)):
            flat = new.reshape(-1, new.shape[-2], new.shape[-1])
            if lay.write_index is not None:
                flat = flat.index_select(0, lay.write_index)
            pool_t.index_copy_(0, lay.write_slots, flat.to(pool_t.dtype))

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q (rows, heads, q_len, dim), k/v (rows, q_len, kv_heads, dim) → (rows, q_len,
        heads * dim)."""
        self.write(layer, k, v)
        rows, heads, q_len, dim = q.shape
        if self.paged and q_len == 1:
            lay, pool = self.layout, self.pool
            out = paged_decode(
                q.view(rows, heads, dim), pool.keys[layer], pool.values[layer],
                lay.block_tables, lay.context_lens, pool.block_size, self.scale,
            )  # fmt: skip
            return out.view(rows, 1, heads * dim)
        keys, values = self._read(layer, k, v)
        kv_heads = keys.shape[1]
        groups = heads // kv_heads
        if groups > 1 and q_len == 1:
            # one query per row: each KV head's query group as its queries, no K/V copies
            out = F.scaled_dot_product_attention(
                q.view(rows, kv_heads, groups, dim),
                keys,
                values,
                attn_mask=self.layout.mask,
                scale=self.scale,
            )
            return out.reshape(rows, 1, heads * dim)
        if groups > 1:
            shape = (rows, kv_heads, groups, keys.shape[2], dim)
            keys = keys[:, :, None].expand(shape).reshape(rows, heads, -1, dim)
            values = values[:, :, None].expand(shape).reshape(rows, heads, -1, dim)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.layout.mask, scale=self.scale
        )
        return out.transpose(1, 2).reshape(rows, q_len, heads * dim)

    def _read(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, kv_heads, kv_len, dim) keys and values each query may see."""
        lay = self.layout
        if lay.read_blocks is None:  # nothing cached: the keys are the new ones
            return k.transpose(1, 2), v.transpose(1, 2)
        pool = self.pool
        heads, dim = k.shape[-2], k.shape[-1]
        by_block = (pool.num_blocks, pool.block_size, heads, dim)
        shape = (lay.rows, lay.kv_len, heads, dim)
        out = []
        for t in (pool.keys[layer], pool.values[layer]):
            gathered = t.view(by_block).index_select(0, lay.read_blocks).view(shape)
            out.append(gathered.transpose(1, 2))
        return out[0], out[1]
