"""engine.paged_decode: the Triton kernel (run by Triton's interpreter on the CPU, in its own
process: TRITON_INTERPRET must be set before triton is imported) against the plain-torch
reference, and the reference against the portable path (gather + SDPA) it stands in for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlserve.engine.attention import PoolAttention
from vlserve.engine.kv_cache import KVPool, RowSpan, build_layout
from vlserve.engine.paged_decode import paged_decode_reference

REPO = Path(__file__).resolve().parents[2]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (block size, kv heads, heads, head dim, dtype): GQA groups of 1, 2 and 4 (4 and 8 padded to
# powers of two: 3 is not), a head dim that is not a power of two, bf16 storage
CASES = [
    (16, 2, 8, 64, torch.float32),
    (4, 2, 4, 32, torch.float32),
    (8, 1, 3, 48, torch.float32),
    (16, 4, 4, 64, torch.bfloat16),
]


def _case(block: int, kv_heads: int, heads: int, dim: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    """A pool of 24 blocks and 4 rows: 1 position, a part block, exact blocks, many blocks, in
    scattered blocks (and padding past each table, as the runner pads with NULL_BLOCK 0)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(24 * block, kv_heads, dim, generator=g).to(dtype)
    values = torch.randn(24 * block, kv_heads, dim, generator=g).to(dtype)
    lens = [1, block + 3, 2 * block, 5 * block - 1]
    order = torch.randperm(23, generator=g) + 1
    tables, used = [], 0
    for n in lens:
        count = -(-n // block)
        tables.append(order[used : used + count].tolist() + [0] * (5 - count))
        used += count
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return (
        q,
        keys,
        values,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
    )


@pytest.mark.skipif(not INTERPRETED, reason="runs in its own process (test below)")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_the_reference(case: tuple) -> None:  # type: ignore[type-arg]
    from vlserve.engine.paged_decode import paged_decode

    block, *_, dtype = case
    q, keys, values, tables, lens = _case(*case)
    scale = q.shape[-1] ** -0.5
    got = paged_decode(q, keys, values, tables, lens, block, scale)
    expected = paged_decode_reference(q, keys, values, tables, lens, block, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_the_kernel_under_tritons_interpreter() -> None:
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel_matches or self_check"],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(CASES) + 1} passed" in done.stdout


def test_the_reference_is_the_portable_path() -> None:
    """The reference (what the kernel is held to) equals PoolAttention's gather + SDPA for a
    decode layout built by the runner's own build_layout."""
    block, kv_heads, heads, dim = 4, 2, 4, 32
    q, keys, values, tables, lens = _case(block, kv_heads, heads, dim, torch.float32)
    pool = KVPool(1, 24, block, kv_heads, dim, torch.float32, torch.device("cpu"))
    pool.keys[0].copy_(keys)
    pool.values[0].copy_(values)
    spans = [
        RowSpan([b for b in row if b][: -(-int(n) // block)], int(n) - 1, int(n))
        for row, n in zip(tables.tolist(), lens, strict=True)
    ]
    layout = build_layout(spans, block, torch.device("cpu"), 8)
    assert torch.equal(layout.context_lens, lens)
    assert torch.equal(layout.block_tables[:, : tables.shape[1]], tables)
    # the step's own K/V are the ones already in the pool at each row's last position
    last = [
        spans[r].block_table[(int(n) - 1) // block] * block + (int(n) - 1) % block
        for r, n in enumerate(lens)
    ]
    k_new = keys[last].view(len(lens), 1, kv_heads, dim)
    v_new = values[last].view(len(lens), 1, kv_heads, dim)
    scale = dim**-0.5
    portable = PoolAttention(pool, layout, scale)(0, q.unsqueeze(2), k_new, v_new)
    expected = paged_decode_reference(q, keys, values, tables, lens, block, scale)
    torch.testing.assert_close(portable.view_as(expected), expected, rtol=1e-5, atol=1e-5)


def test_the_self_check_reports_a_kernel_that_cannot_run_here() -> None:
    """On the CPU without the interpreter, Triton cannot launch: the runner is told why and
    gathers instead (on CUDA, the same check guards against a kernel that disagrees)."""
    from vlserve.engine.paged_decode import self_check

    if INTERPRETED:
        assert self_check(torch.device("cpu"), torch.float32) is None
    else:
        problem = self_check(torch.device("cpu"), torch.float32)
        assert problem is not None and problem.split(":")[0].endswith("Error")
