"""Stand-ins for the engine's tests without a model: a byte-level decoder and a KV pool in
miniature that checks every read."""

from __future__ import annotations

from typing import Any


class ByteDecoder:
    """Byte-level BPE in miniature: token i < 256 is one byte; ids from 256 are special
    tokens that decode to nothing."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")


class SimulatedKV:
    """The KV pool in miniature: position p of a sequence, once computed, leaves in its slot
    (``block_table[p // block_size]``, ``p % block_size``) a mark of everything its K/V depends
    on (the tokens up to and including p); a row reads every earlier slot back through its
    block table, as attention reads the pool, and each must hold its own sequence's mark.
    Sharing a block that a newcomer overwrote, or a cached block computed behind another
    prefix, fails at the read."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def compute(self, seq: Any, start: int, end: int) -> None:
        """``seq`` computes its positions ``[start, end)`` and reads ``[0, end)``."""
        bs = self.block_size
        # a row computes at least one position (its logits come from the last)
        assert start == seq.num_cached_tokens < end <= seq.num_tokens, (start, end)
        assert 0 not in seq.block_table, "the null block was handed out"
        for p in range(start, end):
            self.slots[(seq.block_table[p // bs], p % bs)] = tuple(seq.token_ids[: p + 1])
        for p in range(end):
            slot = (seq.block_table[p // bs], p % bs)
            assert self.slots.get(slot) == tuple(seq.token_ids[: p + 1]), (
                f"{seq.request_id} read position {p} from block {slot[0]}: "
                "K/V computed for other tokens"
            )
