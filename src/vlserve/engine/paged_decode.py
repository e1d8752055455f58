"""Paged decode attention: one query token per row, reading K/V from the pool in place.

The pool is ``(num_blocks * block_size, kv_heads, dim)`` per layer (``kv_cache.KVPool``); row
``r`` owns the blocks ``block_tables[r]`` and attends to its first ``context_lens[r]`` positions
(the new token's K/V already written). ``paged_decode`` is a Triton kernel: one program per
(row, KV head) walks the row's blocks with an online softmax, so nothing is gathered and the
step's shape does not depend on how long the rows are (a device graph can capture it).
``paged_decode_reference`` is the same computation in plain torch (gather + softmax), the
portable path the kernel is tested against under Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported), on the CPU.
"""

from __future__ import annotations

import torch


def paged_decode_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q (rows, heads, dim) → (rows, heads, dim), in plain torch, one row at a time."""
    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty_like(q)
    for r in range(rows):
        n = int(context_lens[r])
        blocks = block_tables[r, : -(-n // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=q.device)).view(-1)
        k = keys[slots[:n]].float().repeat_interleave(heads // kv_heads, dim=1)  # (n, heads, dim)
        v = values[slots[:n]].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[r].float(), k) * scale
        out[r] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def paged_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel over the pool: arguments as ``paged_decode_reference``."""
    import triton

    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    out = torch.empty_like(q)
    _kernel()[(rows, kv_heads)](
        q, keys, values, block_tables, context_lens, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale,
        GROUPS=groups,
        GROUPS_P2=max(triton.next_power_of_2(groups), 1),
        DIM=dim,
        DIM_P2=triton.next_power_of_2(dim),
        BLOCK=block_size,
    )  # fmt: skip
    return out


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel once on ``device`` against the reference (a small random case, GQA,
    several blocks): None when they agree, else why not (the runner then gathers instead)."""
    try:
        g = torch.Generator().manual_seed(0)
        keys, values = (torch.randn(64, 2, 64, generator=g).to(device, dtype) for _ in range(2))
        q = torch.randn(3, 8, 64, generator=g).to(device, dtype)
        tables = torch.tensor([[1, 2, 3], [3, 0, 0], [2, 1, 0]], dtype=torch.int32, device=device)
        lens = torch.tensor([40, 5, 17], dtype=torch.int32, device=device)
        got = paged_decode(q, keys, values, tables, lens, 16, 0.125)
        want = paged_decode_reference(q, keys, values, tables, lens, 16, 0.125)
        error = float((got.float() - want.float()).abs().max())
    except Exception as exc:  # a kernel that cannot compile or launch here
        return f"{type(exc).__name__}: {exc}"
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    return None if error <= limit else f"differs from the reference by {error:.3g}"


_KERNEL = None


def _kernel():  # type: ignore[no-untyped-def]
    """The jitted kernel, defined on first use (triton is imported only where it runs)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
        q_row, q_head, kv_slot, kv_head, table_row, out_row, out_head,
        scale,
        GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, DIM: tl.constexpr,
        DIM_P2: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GROUPS_P2)
        d = tl.arange(0, DIM_P2)
        t = tl.arange(0, BLOCK)
        g_ok = g < GROUPS
        d_ok = d < DIM
        heads = kvh * GROUPS + g
        q = tl.load(
            q_ptr + row * q_row + heads[:, None] * q_head + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        length = tl.load(lens_ptr + row)
        m = tl.full([GROUPS_P2], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_P2], tl.float32)
        acc = tl.zeros([GROUPS_P2, DIM_P2], tl.float32)
        for b in range(0, tl.cdiv(length, BLOCK)):  # the row's blocks only
            block = tl.load(tables_ptr + row * table_row + b).to(tl.int64)
            ok = b * BLOCK + t < length
            offs = (block * BLOCK + t)[:, None] * kv_slot + kvh * kv_head + d[None, :]
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=kv_ok, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (groups, block)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # online softmax
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / total[:, None]
        tl.store(
            out_ptr + row * out_row + heads[:, None] * out_head + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )

    _KERNEL = kernel
    return kernel
