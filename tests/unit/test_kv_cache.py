"""Step layouts over the paged pool: where each row writes, what it reads, what it may attend."""

from __future__ import annotations

import torch

from vlserve.engine.kv_cache import PAD_ROW, RowSpan, build_layout, row_bucket

CPU = torch.device("cpu")


def test_row_buckets() -> None:
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 24, 32]


def test_fresh_prefill_writes_its_tokens_and_reads_its_own_keys() -> None:
    lay = build_layout([RowSpan([3, 5], 0, 20), RowSpan([7], 0, 3)], 16, CPU)
    assert (lay.rows, lay.q_len, lay.kv_len) == (2, 20, 20)
    assert lay.read_blocks is None  # attention reads the new keys themselves
    row0 = [3 * 16 + p for p in range(16)] + [5 * 16 + p for p in range(4)]
    assert lay.write_slots.tolist() == row0 + [7 * 16, 7 * 16 + 1, 7 * 16 + 2]
    assert lay.write_index is not None and lay.write_index.tolist()[-3:] == [20, 21, 22]
    causal = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    assert torch.equal(lay.mask[0, 0], causal)
    assert lay.mask[1, 0, 2].tolist()[:4] == [True, True, True, False]
    assert lay.mask[1, 0, 10].sum() == 3  # a padding query sees the row's keys only
    assert lay.last_index.tolist() == [19, 2]


def test_prefill_after_a_prefix_hit_reads_the_cached_blocks() -> None:
    lay = build_layout([RowSpan([4, 9], 16, 18)], 16, CPU)
    assert (lay.q_len, lay.kv_len) == (2, 32)
    assert lay.read_blocks is not None and lay.read_blocks.tolist() == [4, 9]
    assert lay.write_slots.tolist() == [9 * 16, 9 * 16 + 1]
    assert lay.mask[0, 0, 0].sum() == 17 and lay.mask[0, 0, 1].sum() == 18


def test_decode_reads_a_bucketed_length_and_padding_rows_touch_only_the_null_block() -> None:
    # a decode row computes its last token: start = end - 1
    lay = build_layout([RowSpan([2, 6], 19, 20), RowSpan([8], 15, 16), PAD_ROW], 16, CPU, 128)
    assert (lay.rows, lay.q_len, lay.kv_len) == (3, 1, 128)
    assert lay.write_slots.tolist() == [6 * 16 + 3, 8 * 16 + 15, 0]
    blocks = lay.read_blocks.view(3, -1)  # type: ignore[union-attr]
    assert blocks[0, :2].tolist() == [2, 6] and int(blocks[0, 2:].sum()) == 0
    assert int(blocks[2].sum()) == 0
    assert [int(lay.mask[b, 0, 0].sum()) for b in range(3)] == [20, 16, 1]
